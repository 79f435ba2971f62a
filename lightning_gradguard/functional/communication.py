"""Compressed DDP communication: a gradient all-reduce that sends low-bit codes instead of float32 values.

Per bucket and rank, the two hops of ZeRO++ qgZ (Wang et al. 2023): ``p = g + e`` (the bucket plus this rank's
error-feedback residual) is quantized blockwise (:func:`~lightning_gradguard.functional.quantization.encode`, one
float32 scale per block) and cut into one chunk per rank; an all-to-all gives rank ``j`` every rank's codes of chunk
``j``, which it decodes, sums and quantizes once; an all-gather sends these codes to every rank, which all decode the
same bits (replicas stay bitwise identical) and divide by the world size. The errors of both hops go into the
residuals (Karimireddy et al. 2019; DoubleSqueeze, Tang et al. 2019): over ``T`` steps the world size times the sum
of the averages equals the sum of all ranks' gradients minus the sum of their residuals.

A block with a NaN or Inf is sent with a NaN scale, so the average is NaN there on every rank, and each rank's flag
travels with its second-hop codes (:attr:`CommStats.nonfinite_ranks`). A step's new residuals become current after
its last bucket, and only if the whole reduction was finite. Codes are packed densely: ``bits`` per element for
``"stochastic"``, ``ceil(log2(2 * levels + 1))`` for ``"qsgd"``, 2 for ``"terngrad"``, 1 for ``"sign"``. Every
per-step decision is taken on the device. DDP only: FSDP2's reduce-scatter has no DDP-style hook.
"""

import math
import warnings
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradguard.functional.quantization import (
    TERNGRAD_CLAMP_SIGMA,
    Method,
    block_scales,
    check_error_feedback,
    check_int,
    decode,
    derive_seed,
    encode,
    resolve_levels,
)

__all__ = ["CommStats", "QuantizedCommState", "chunk_layout", "pack_codes", "quantized_allreduce_hook", "unpack_codes",
           "wire_bytes"]


def pack_codes(codes: Tensor, width: int) -> Tensor:
    """Pack unsigned ``uint8`` codes below ``2**width`` (a multiple of 8 of them) into ``width`` bits each, the
    first code in the lowest bits: 8 codes fill ``width`` bytes.

    Example::

        >>> packed = pack_codes(torch.tensor([1, 0, 3, 2, 0, 1, 1, 3], dtype=torch.uint8), 2)
        >>> packed, unpack_codes(packed, 2)
        (tensor([177, 212], dtype=torch.uint8), tensor([1, 0, 3, 2, 0, 1, 1, 3], dtype=torch.uint8))
    """
    if width == 8:
        return codes
    groups = codes.view(-1, 8)
    out = torch.zeros(groups.shape[0], width, dtype=torch.uint8, device=codes.device)
    for i in range(8):
        byte, shift = divmod(width * i, 8)
        out[:, byte] |= groups[:, i] << shift  # uint8: the bits shifted past the byte drop out
        if shift + width > 8:
            out[:, byte + 1] |= groups[:, i] >> (8 - shift)
    return out.view(-1)


def unpack_codes(data: Tensor, width: int) -> Tensor:
    """The codes that :func:`pack_codes` packed into ``data``."""
    if width == 8:
        return data
    groups = data.view(-1, width)
    out = torch.empty(groups.shape[0], 8, dtype=torch.uint8, device=data.device)
    for i in range(8):
        byte, shift = divmod(width * i, 8)
        value = groups[:, byte] >> shift
        if shift + width > 8:
            value |= groups[:, byte + 1] << (8 - shift)
        torch.bitwise_and(value, (1 << width) - 1, out=out[:, i])
    return out.view(-1)


class CommStats(NamedTuple):
    """The last reduced step: bytes this rank sent, those of a float32 ring all-reduce (``2 (W-1)/W * 4 * numel``),
    this rank's first-hop ``||Q(p) - p|| / ||p||`` (a device scalar) and a device flag per rank: its own gradients had
    a NaN or Inf."""

    bytes_sent: int
    fp32_bytes: int
    rel_error: Tensor
    nonfinite_ranks: Tensor

    @property
    def ratio(self) -> float:
        """How many times fewer bytes than float32."""
        return self.fp32_bytes / max(self.bytes_sent, 1)


def chunk_layout(numel: int, world_size: int, block_size: int) -> tuple[int, int]:
    """``(blocks, block_len)`` of each of the ``world_size`` chunks of a bucket: ``block_len`` is at most
    ``block_size`` rounded up to a multiple of 8 (whole bytes at any code width).

    Example::

        >>> chunk_layout(10_000, 4, 2048)
        (2, 1256)
    """
    target = -(-numel // world_size)
    blocks = -(-target // block_size)
    return blocks, (-(-target // blocks) + 7) // 8 * 8


def wire_bytes(numel: int, world_size: int, width: int, block_size: int = 2048) -> int:
    """Bytes one rank sends to reduce a bucket of ``numel`` elements: to each of the ``W - 1`` other ranks, a chunk
    of ``width``-bit codes with its float32 block scales in each hop, and a non-finite flag byte in the second.

    Example::

        >>> wire_bytes(10_000, 4, 8), 2 * 3 / 4 * 4 * 10_000  # against a float32 ring all-reduce
        (15123, 60000.0)
    """
    blocks, block_len = chunk_layout(numel, world_size, block_size)
    row = 4 * blocks + blocks * block_len * width // 8
    return (world_size - 1) * (2 * row + 1)


class _Bucket:
    """One DDP bucket (see :func:`chunk_layout`) and this rank's residuals for it."""

    def __init__(self, params: list[Tensor], numel: int, world: int, block_size: int, ef: bool) -> None:
        self.params, self.numel = params, numel
        self.blocks, self.block_len = chunk_layout(numel, world, block_size)
        self.chunk = self.blocks * self.block_len
        device = params[0].device
        self.residual = torch.zeros(world * self.chunk, device=device) if ef else None
        self.previous = torch.zeros(world * self.chunk, device=device) if ef else None

    def matches(self, params: list[Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))


class QuantizedCommState:
    r"""State of :func:`quantized_allreduce_hook`: the method, this rank's residuals and the last step's statistics.

    Args:
        method: ``"stochastic"``, ``"qsgd"``, ``"terngrad"`` (per block: clip to 2.5 sigma, ternarize) or
            ``"sign"`` (per block ``mean|p|`` times the sign bit).
        bits: code width of ``"stochastic"``, 2 to 8 (default 8); for ``"qsgd"`` the default of ``levels``.
        levels: levels of ``"qsgd"``, 1 to 127.
        block_size: at most this many elements share a scale.
        error_feedback: default on for ``"sign"`` (required) and 4 bits or more, where ``||Q(p) - p|| < ||p||``;
            off where the error can exceed the input and would grow when fed back (2 and 3 bits, ``"terngrad"``,
            ``"qsgd"`` under 7 levels).
        seed: base of the random draws, seeded per ``(step, bucket, rank, hop)``.
        process_group: the DDP process group (default: the world). The second hop runs on a twin group, so that it
            can be issued from the first hop's completion callbacks in bucket order.

    After each backward pass :attr:`stats` describes the step. A step the optimizer skips calls :meth:`undo_step`.
    The residuals differ per rank: checkpoint every rank's :meth:`state_dict` and load each rank its own; a load on
    another world size or bucket layout warns and restarts error feedback from zero.

    Raises:
        TypeError, ValueError: for arguments of the wrong type, out of range, or that do not apply to ``method``.

    Example::

        >>> state = QuantizedCommState("stochastic", bits=4)
        >>> state.width, state.error_feedback
        (4, True)
        >>> # ddp_model.register_comm_hook(state, quantized_allreduce_hook); after each backward: state.stats
    """

    def __init__(self, method: Method = "stochastic", *, bits: Optional[int] = None, levels: Optional[int] = None,
                 block_size: int = 2048, error_feedback: Optional[bool] = None, seed: int = 0,
                 process_group: Optional[Any] = None) -> None:
        self.levels = resolve_levels(method, bits, levels)
        if method == "qsgd":
            check_int(self.levels, "levels", 1, 127)  # codes of at most 8 bits
        self.method = method
        self.width = 1 if method == "sign" else math.ceil(math.log2(2 * self.levels + 1))
        self.block_size = check_int(block_size, "block_size", 1)
        error_feedback = check_error_feedback(method, error_feedback)
        contracts = method == "sign" or (method != "terngrad" and self.levels >= 7)
        self.error_feedback = contracts if error_feedback is None else error_feedback
        self.seed = check_int(seed, "seed", 0)
        self.process_group = process_group
        self.step = -1  # the step being reduced, or last reduced
        self._gather_group: Optional[Any] = None
        self._buckets: dict[int, _Bucket] = {}  # by bucket index, the current layout
        self._slots: dict[int, tuple[str, _Bucket, int, Tensor]] = {}  # id(param) -> (key, bucket, offset, param)
        self._layout: dict[int, list[tuple[int, ...]]] = {}  # DDP's first bucket layout: the keys' reference
        self._pending: Optional[dict[str, Any]] = None  # a loaded state_dict not imported yet
        self._committed: list[_Bucket] = []  # buckets whose residual the step updates (new one in `previous`)
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}
        self._reset_stats(torch.device("cpu"), 1)

    @property
    def stats(self) -> CommStats:
        """The statistics of the last step reduced (read them after the backward pass, before the next one)."""
        rel_error = (self._error_sq / self._input_sq.clamp(min=1e-30)).sqrt()
        return CommStats(self._bytes, self._fp32_bytes, rel_error, self._nonfinite)

    def reset_residuals(self) -> None:
        """Zero this rank's residuals (and drop a loaded state not imported yet)."""
        for bucket in self._buckets.values():
            if bucket.residual is not None:
                bucket.residual.zero_()
                bucket.previous.zero_()
        self._pending, self._committed = None, []

    def undo_step(self) -> None:
        """Restore the residuals from before the last step, for a step the optimizer skipped: its quantization error
        belongs to gradients never applied. Call it after the backward pass; a second call does nothing."""
        for bucket in self._committed:
            bucket.residual, bucket.previous = bucket.previous, bucket.residual
        self._committed = []

    def state_dict(self, before_last_step: bool = False) -> dict[str, Any]:
        """This rank's residuals by parameter (keyed by position in DDP's first bucket layout), that layout, the
        world size and the step; with ``before_last_step``, the residuals that :meth:`undo_step` would restore."""
        if self._pending is not None and not self._buckets:  # loaded, not imported yet
            return dict(self._pending)
        undone = {id(bucket) for bucket in self._committed} if before_last_step else set()
        residuals = {key: (b.previous if id(b) in undone else b.residual)[o : o + p.numel()].view_as(p).clone()
                     for key, b, o, p in self._residual_slots()}
        world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        return {"step": self.step, "world_size": world, "layout": dict(self._layout), "residuals": residuals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict.get("step", self.step))
        self.reset_residuals()
        self._pending = dict(state_dict)
        if self._layout:  # DDP's first layout is known: import now, else as its buckets appear
            self._import(list(self._layout))
            if self._pending is not None:
                self._check_complete()

    # ------------------------------------------------------------------------------------------------------------
    def _residual_slots(self) -> list[tuple[str, _Bucket, int, Tensor]]:
        """``(key, bucket, offset, parameter)`` of every parameter with a residual, in the current layout."""
        return [slot for slot in self._slots.values() if slot[1].residual is not None]

    def _begin_step(self, device: torch.device, world: int) -> None:
        self.step += 1
        if self._pending is not None and self._layout:  # DDP's first layout is complete: every bucket was seen
            self._check_complete()
        self._reset_stats(device, world)

    def _reset_stats(self, device: torch.device, world: int) -> None:
        self._bytes = self._fp32_bytes = 0
        self._error_sq, self._input_sq = torch.zeros((), device=device), torch.zeros((), device=device)
        self._nonfinite = torch.zeros(world, dtype=torch.bool, device=device)
        self._committed, self._chain = [], None
        self._finite = torch.ones((), dtype=torch.bool, device=device)

    def _commit(self) -> None:
        """At the end of a step: the new residuals become current if the whole step's reduction was finite."""
        for bucket in self._committed:
            torch.where(self._finite, bucket.previous, bucket.residual, out=bucket.previous)
            bucket.residual, bucket.previous = bucket.previous, bucket.residual

    def _bucket(self, bucket: Any, world: int) -> _Bucket:
        """The layout of ``bucket``, rebuilt when DDP changed its parameters (it does after the first iteration),
        carrying each parameter's residual over."""
        index, params = bucket.index(), bucket.parameters()
        current = self._buckets.get(index)
        if current is not None and current.matches(params):
            return current
        new = _Bucket(params, bucket.buffer().numel(), world, self.block_size, self.error_feedback)
        first = all(id(p) not in self._slots for p in params)  # a bucket of DDP's first layout
        offset = 0
        for position, p in enumerate(params):
            key, old, old_offset, _ = self._slots.get(id(p), (f"{index}.{position}", None, 0, p))
            if old is None:
                self._layout.setdefault(index, []).append(tuple(p.shape))
            elif new.residual is not None:
                new.residual[offset : offset + p.numel()] = old.residual[old_offset : old_offset + p.numel()]
            self._slots[id(p)] = (key, new, offset, p)
            offset += p.numel()
        self._buckets[index] = new
        if self._pending is not None and first:
            self._import([index])
        return new

    def _import(self, indices: list[int]) -> None:
        """Copy the loaded residuals of the parameters of DDP's first-layout buckets ``indices`` into place, after
        checking the world size and those buckets against the saved ones."""
        world = dist.get_world_size(self.process_group)
        saved = self._saved_layout()
        if self._pending.get("world_size", world) != world or any(saved.get(i) != self._layout[i] for i in indices):
            self._mismatch()
            return
        residuals = self._pending.get("residuals", {})
        for key, bucket, offset, p in self._residual_slots():
            if key in residuals and int(key.split(".")[0]) in indices:
                bucket.residual[offset : offset + p.numel()] = residuals[key].reshape(-1)

    def _check_complete(self) -> None:
        """After DDP's first layout was imported bucket by bucket: the saved layout has no other bucket."""
        if set(self._saved_layout()) != set(self._layout):
            self._mismatch()
        self._pending = None

    def _saved_layout(self) -> dict[int, list[tuple[int, ...]]]:
        return {int(i): [tuple(s) for s in shapes] for i, shapes in self._pending.get("layout", {}).items()}

    def _mismatch(self) -> None:
        world = dist.get_world_size(self.process_group)
        warnings.warn(
            f"QuantizedCommState: the saved residuals belong to world size {self._pending.get('world_size')} and"
            f" bucket layout {self._saved_layout()}, but this run has world size {world} and layout {self._layout};"
            " error feedback restarts from zero."
        )
        self.reset_residuals()

    def _generator(self, device: torch.device, *keys: int) -> torch.Generator:
        # one generator per hop: the second hop draws on a communication thread while the first draws on DDP's
        generator = self._generators.setdefault((device, keys[-1]), torch.Generator(device=device))
        return generator.manual_seed(derive_seed(self.seed, self.step, *keys))

    def _payload(self, flat: Tensor, rows: int, layout: _Bucket, generator: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``flat``: ``rows`` rows of bytes ``[float32 block scales | packed codes]`` (NaN scales for blocks
        that are not finite), the decoded values, and whether any block is not finite (a device flag)."""
        block_len = layout.block_len
        blocks = flat.view(-1, block_len)
        if self.method == "terngrad":
            bound = TERNGRAD_CLAMP_SIGMA / math.sqrt(block_len) * torch.linalg.vector_norm(blocks, dim=1, keepdim=True)
            blocks = torch.minimum(torch.maximum(blocks, -bound), bound)
        scales = block_scales(blocks, self.method)
        finite = torch.isfinite(scales)
        # NaN codes would not fit in the bytes: the blocks that are not finite are coded as zeros with a NaN scale
        safe = torch.where(finite.unsqueeze(1), blocks, blocks.new_zeros(()))  # a 0-d tensor: a Python 0.0 is slower
        codes, _ = encode(safe, self.method, self.levels, scales=torch.where(finite, scales, 0.0), generator=generator)
        scales = torch.where(finite, scales, math.nan)
        decoded = decode(codes, scales, self.levels).view(-1)
        unsigned = (codes > 0) if self.method == "sign" else codes.add_(self.levels)
        packed = pack_codes(unsigned.to(torch.uint8).view(-1), self.width)
        payload = torch.cat([scales.view(rows, -1).view(torch.uint8), packed.view(rows, -1)], 1)
        return payload, decoded, ~finite.all()

    def _values(self, rows: Tensor, layout: _Bucket) -> tuple[Tensor, Tensor]:
        """The decoded values ``(rows, chunk)`` and block scales ``(rows, blocks)`` of :meth:`_payload` rows."""
        scales = rows[:, : 4 * layout.blocks].contiguous().view(torch.float32)
        unsigned = unpack_codes(rows[:, 4 * layout.blocks :].contiguous().view(-1), self.width).float()
        codes = unsigned.mul_(2).sub_(1) if self.method == "sign" else unsigned.sub_(self.levels)
        values = decode(codes.view(-1, layout.block_len), scales.view(-1), self.levels)
        return values.view(rows.shape[0], -1), scales


def quantized_allreduce_hook(state: QuantizedCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average ``bucket`` over the ranks with quantized codes in two hops (see the module docstring).

    Register it with ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``. Works on any backend with
    ``all_to_all_single`` and ``all_gather_single`` (gloo, NCCL).

    Example::

        >>> state = QuantizedCommState("stochastic", bits=8)
        >>> ddp_model.register_comm_hook(state, quantized_allreduce_hook)  # doctest: +SKIP
        >>> loss.backward()  # doctest: +SKIP
        >>> stats = state.stats  # doctest: +SKIP
        >>> stats.bytes_sent, stats.ratio, stats.rel_error, stats.nonfinite_ranks  # doctest: +SKIP
    """
    buffer, index = bucket.buffer(), bucket.index()
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if state._gather_group is None:  # created on DDP's thread, at the same call on every rank
        state._gather_group = dist.new_group(dist.get_process_group_ranks(group), use_local_synchronization=True)
    if index == 0:  # DDP launches its buckets in index order: bucket 0 opens a step
        state._begin_step(buffer.device, world)
    layout = state._bucket(bucket, world)
    n, chunk, residual = layout.numel, layout.chunk, layout.residual
    p = torch.empty(world * chunk, device=buffer.device)
    p[n:] = 0.0
    if residual is None:
        p[:n] = buffer
    else:
        torch.add(residual[:n], buffer, out=p[:n])
    send, decoded, local_bad = state._payload(p, world, layout, state._generator(buffer.device, index, rank, 1))
    # the new residual waits in `previous` until the end of the step
    error = torch.sub(p, decoded, out=layout.previous) if residual is not None else p - decoded
    state._error_sq += torch.where(local_bad, 0.0, torch.linalg.vector_norm(error[:n]).square())
    state._input_sq += torch.where(local_bad, 0.0, torch.linalg.vector_norm(p[:n]).square())
    state._bytes += wire_bytes(n, world, state.width, state.block_size)
    state._fp32_bytes += 8 * (world - 1) * n // world
    if residual is not None:
        state._committed.append(layout)
    received = torch.empty_like(send)
    first_hop = dist.all_to_all_single(received, send, group=group, async_op=True).get_future()
    previous, last = state._chain, bucket.is_last()

    def second_hop(fut: torch.futures.Future) -> Tensor:
        # the second hops run one bucket after the other, so that every rank issues them in the same order
        if previous is not None:
            previous.wait()
        fut.wait()  # an error of the first hop surfaces here
        total = state._values(received, layout)[0].sum(0)
        total[max(n - rank * chunk, 0) :] = 0.0  # the padding of this rank's chunk
        own, own_decoded, _ = state._payload(total, 1, layout, state._generator(total.device, index, rank, 2))
        payload = torch.cat([local_bad.view(1).to(torch.uint8), own.view(-1)])
        gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
        dist.all_gather_single(gathered, payload, group=state._gather_group)
        rows = gathered.view(world, -1)
        values, scales = state._values(rows[:, 1:], layout)
        torch.div(values.view(-1)[:n], world, out=buffer)
        state._nonfinite |= rows[:, 0].bool()
        state._finite &= torch.isfinite(scales).all()
        if residual is not None:
            layout.previous[rank * chunk : (rank + 1) * chunk] += total - own_decoded
            layout.previous[n:] = 0.0
        if last:  # DDP's last bucket of the step: every second hop has run
            state._commit()
        return buffer

    state._chain = first_hop.then(second_hop)
    return state._chain
