"""Compressed DDP communication: a gradient all-reduce that sends low-bit codes instead of float32 values.

Per bucket, the two hops of ZeRO++ qgZ (Wang et al. 2023): each rank encodes ``p = g + e``, its bucket plus its
residual (:func:`~lightning_gradguard.functional.quantization.encode`, one float32 scale per block), in one chunk per
rank; an all-to-all gives rank ``j`` every rank's chunk ``j``, which it decodes, sums and encodes again; an all-gather
sends these codes to every rank, which all decode the same bits and divide by the world size. Both hops' errors go
into the residuals (DoubleSqueeze, Tang et al. 2019), so over ``T`` steps ``W * sum(averages) = sum(all ranks'
gradients) - sum(their residuals)``. A block with a NaN or Inf travels with a NaN scale, so that every rank's average
is NaN there, and each rank's flag with its second-hop codes; a step's new residuals become current only if the whole
reduction was finite. No host reads. DDP only: FSDP2's reduce-scatter has no DDP-style hook.
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
    check_error_feedback,
    check_int,
    decode,
    derive_seed,
    encode,
    relative_error,
    resolve_levels,
)

__all__ = ["CommStats", "QuantizedCommState", "pack_codes", "quantized_allreduce_hook", "unpack_codes", "wire_bytes"]


def pack_codes(codes: Tensor, width: int) -> Tensor:
    """Pack unsigned ``uint8`` codes below ``2**width`` (a multiple of 8 of them) into ``width`` bits each, the
    first code in the lowest bits: 8 codes fill ``width`` bytes."""
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
    this rank's first-hop ``||Q(p) - p|| / ||p||`` and a flag per rank: its own gradients had a NaN or Inf."""

    bytes_sent: int
    fp32_bytes: int
    rel_error: Tensor
    nonfinite_ranks: Tensor

    @property
    def ratio(self) -> float:
        """How many times fewer bytes than float32."""
        return self.fp32_bytes / max(self.bytes_sent, 1)


def _chunk_layout(numel: int, world_size: int, block_size: int) -> tuple[int, int]:
    """``(blocks, block_len)`` of each of the ``world_size`` chunks of a bucket: ``block_len`` is at most
    ``block_size`` rounded up to a multiple of 8 (whole bytes at any code width)."""
    target = -(-numel // world_size)
    blocks = -(-target // block_size)
    return blocks, (-(-target // blocks) + 7) // 8 * 8


def wire_bytes(numel: int, world_size: int, width: int, block_size: int = 2048) -> int:
    """Bytes one rank sends to reduce a bucket of ``numel`` elements: to each of the ``W - 1`` other ranks, a chunk
    of ``width``-bit codes with its float32 block scales in each hop, and a non-finite flag byte in the second."""
    blocks, block_len = _chunk_layout(numel, world_size, block_size)
    row = 4 * blocks + blocks * block_len * width // 8
    return (world_size - 1) * (2 * row + 1)


class _Bucket:
    """One DDP bucket (see ``_chunk_layout``), this rank's residuals for it (the current one, and the one from before
    the step, where the step's new one is built) and its generator (the hops of a bucket draw one after the other)."""

    def __init__(self, params: list[Tensor], numel: int, world: int, block_size: int, ef: bool) -> None:
        self.params, self.numel = params, numel
        self.blocks, self.block_len = _chunk_layout(numel, world, block_size)
        self.chunk = self.blocks * self.block_len
        device = params[0].device
        self.residual = torch.zeros(world * self.chunk, device=device) if ef else None
        self.previous = torch.zeros(world * self.chunk, device=device) if ef else None
        self.generator = torch.Generator(device=device)


class QuantizedCommState:
    r"""State of :func:`quantized_allreduce_hook`: the method, this rank's residuals and the last step's statistics.

    Args:
        method: ``"stochastic"``, ``"qsgd"``, ``"terngrad"`` (per block: clip to 2.5 sigma, ternarize; 2-bit codes)
            or ``"sign"`` (per block ``mean|p|`` times the sign bit; 1 bit).
        bits: code width of ``"stochastic"``, 2 to 8 (default 8); for ``"qsgd"`` the default of ``levels``.
        levels: levels of ``"qsgd"``, 1 to 127: codes of ``ceil(log2(2 * levels + 1))`` bits.
        block_size: at most this many elements share a scale.
        error_feedback: default on where ``||Q(p) - p|| < ||p||`` (sign, 4 bits or more, qsgd from 7 levels), off
            where the fed-back error would grow (2 and 3 bits, terngrad).
        seed: base of the random draws, seeded per ``(step, bucket, rank, hop)``.
        process_group: the DDP process group (default: the world); the second hop runs on a twin group, issued from
            the first hop's completion callbacks in bucket order.

    :attr:`stats` describes the last step; a step the optimizer skips calls :meth:`undo_step`. Each rank saves and
    loads its own :meth:`state_dict`; on another world size or bucket layout a load restarts error feedback from zero.

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
        self._reset_stats(torch.device("cpu"), 1)

    @property
    def stats(self) -> CommStats:
        """The statistics of the last step reduced (read them after the backward pass, before the next one)."""
        return CommStats(self._bytes, self._fp32_bytes, relative_error(self._error_sq, self._input_sq), self._nonfinite)

    def reset_residuals(self) -> None:
        """Zero this rank's residuals (and drop a loaded state not imported yet)."""
        for bucket in self._buckets.values():
            if bucket.residual is not None:
                bucket.residual.zero_()
                bucket.previous.zero_()
        self._pending, self._committed = None, []

    def undo_step(self) -> None:
        """After the backward pass of a step the optimizer skips: restore the residuals from before it (its errors
        belong to gradients never applied); a second call does nothing."""
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
                     for key, b, o, p in self._slots.values() if b.residual is not None}
        world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        return {"step": self.step, "world_size": world, "layout": dict(self._layout), "residuals": residuals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict.get("step", self.step))
        self.reset_residuals()
        self._pending = dict(state_dict)
        if self._layout:  # DDP's first layout is known: import now, else as its buckets appear
            self._import(list(self._layout), complete=True)

    def _begin_step(self, device: torch.device, world: int) -> None:
        self.step += 1
        if self._pending is not None and self._layout:  # DDP's first layout is complete: every bucket was seen
            self._import([], complete=True)
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
        """The layout of ``bucket``, rebuilt with the residuals carried over when DDP changed its parameters."""
        index, params = bucket.index(), bucket.parameters()
        current = self._buckets.get(index)
        if current is not None and list(map(id, params)) == list(map(id, current.params)):  # held there: ids stay valid
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

    def _import(self, indices: list[int], complete: bool = False) -> None:
        """Copy the loaded residuals of DDP's first-layout buckets ``indices`` into place, if the world size and those
        buckets (with ``complete``, all of them) are the saved ones; else warn and restart error feedback from zero."""
        world = dist.get_world_size(self.process_group)
        saved = {int(i): [tuple(s) for s in shapes] for i, shapes in self._pending.get("layout", {}).items()}
        if (self._pending.get("world_size", world) != world or any(saved.get(i) != self._layout[i] for i in indices)
                or (complete and set(saved) != set(self._layout))):
            warnings.warn("QuantizedCommState: the saved residuals belong to world size"
                          f" {self._pending.get('world_size')} and bucket layout {saved}, but this run has world size"
                          f" {world} and layout {self._layout}; error feedback restarts from zero.")
            self.reset_residuals()
            return
        residuals = self._pending.get("residuals", {})
        for key, bucket, offset, p in self._slots.values():
            if key in residuals and bucket.residual is not None and int(key.split(".")[0]) in indices:
                bucket.residual[offset : offset + p.numel()] = residuals[key].reshape(-1)
        if complete:
            self._pending = None

    def _payload(self, flat: Tensor, rows: int, layout: _Bucket, *keys: int) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``flat`` with draws seeded by ``(seed, step, *keys)``: ``rows`` rows of bytes ``[float32 block
        scales | packed codes]``, the decoded values, and whether any block is not finite (a device flag)."""
        generator = layout.generator.manual_seed(derive_seed(self.seed, self.step, *keys))
        blocks = flat.view(-1, layout.block_len)
        if self.method == "terngrad":  # per block: clip to TERNGRAD_CLAMP_SIGMA root mean squares
            rms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True) / math.sqrt(layout.block_len)
            blocks = blocks.clamp(-TERNGRAD_CLAMP_SIGMA * rms, TERNGRAD_CLAMP_SIGMA * rms)
        codes, scales = encode(blocks, self.method, self.levels, generator=generator)
        finite = torch.isfinite(scales)
        # a block that is not finite travels as zero codes (NaN codes do not fit in the bytes) with a NaN scale
        scales = torch.where(finite, scales, math.nan)
        decoded = decode(codes.nan_to_num_(0.0), scales, self.levels).view(-1)
        unsigned = (codes > 0) if self.method == "sign" else codes.add_(self.levels)
        packed = pack_codes(unsigned.to(torch.uint8).view(-1), self.width)
        payload = torch.cat([scales.view(rows, -1).view(torch.uint8), packed.view(rows, -1)], 1)
        return payload, decoded, ~finite.all()

    def _values(self, rows: Tensor, layout: _Bucket) -> tuple[Tensor, Tensor]:
        """The decoded values ``(rows, chunk)`` and block scales ``(rows, blocks)`` of :meth:`_payload` rows."""
        scales = rows[:, : 4 * layout.blocks].contiguous().view(torch.float32)
        unsigned = unpack_codes(rows[:, 4 * layout.blocks :].contiguous().view(-1), self.width).float()
        codes = unsigned.mul_(2).sub_(1) if self.method == "sign" else unsigned.sub_(self.levels)
        codes = codes.view(-1, layout.block_len)
        return decode(codes, scales.view(-1), self.levels, out=codes).view(rows.shape[0], -1), scales


def quantized_allreduce_hook(state: QuantizedCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average ``bucket`` over the ranks with quantized codes in two hops (see the module docstring), on any backend
    with ``all_to_all_single`` and ``all_gather_single`` (gloo, NCCL). Register it with
    ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``; after each backward, read ``state.stats``."""
    buffer, index = bucket.buffer(), bucket.index()
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if state._gather_group is None:  # created on DDP's thread, at the same call on every rank
        state._gather_group = dist.new_group(dist.get_process_group_ranks(group), use_local_synchronization=True)
    if index == 0:  # DDP launches its buckets in index order: bucket 0 opens a step
        state._begin_step(buffer.device, world)
    layout = state._bucket(bucket, world)
    n, chunk, residual = layout.numel, layout.chunk, layout.residual
    p = torch.empty(world * chunk, device=buffer.device)  # the bucket plus its residual, zero-padded to whole chunks
    p[n:] = 0.0
    torch.add(buffer, residual[:n] if residual is not None else 0.0, out=p[:n])
    send, decoded, local_bad = state._payload(p, world, layout, index, rank, 1)
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
        own, own_decoded, _ = state._payload(total, 1, layout, index, rank, 2)
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
