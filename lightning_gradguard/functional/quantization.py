"""Low-bit gradient quantizers with error feedback, without host syncs.

- ``"stochastic"``: per block, ``Q(g) = round_stochastic(g / max|g| * L) * max|g| / L`` with ``L = 2**(bits-1) - 1``
  levels on each side of zero. Unbiased.
- ``"qsgd"`` (Alistarh et al., 2017): the block's L2 norm as scale and ``L = s`` levels. Unbiased.
- ``"terngrad"`` (Wen et al., 2017): per tensor, clip to ``+-2.5 sigma``, then ``max|g| * sign(g) *
  Bernoulli(|g| / max|g|)``. Unbiased on the clipped gradient.
- ``"sign"`` (Karimireddy et al., 2019): per tensor ``mean|p|`` times the sign bit, always with error feedback.

Error feedback: ``p = g + e`` is quantized and ``e <- p - Q(p)`` carried over, so over ``T`` calls ``sum(Q) = sum(g)
- e_T``. An outlier bound (``clamp_sigma``, or ``clamp_quantile`` estimated from ``QUANTILE_SAMPLES`` elements per
tensor) clamps ``p`` first; what it removes is dropped, not fed back. Draws are seeded with :func:`derive_seed` of
``(seed, step, stream, group, shard coordinate)``: DDP replicas draw alike, FSDP2 shards independently, a resumed run
as the uninterrupted one. Non-finite tensors are left untouched and keep their residual.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_gradguard.functional.norms import as_local_tensor

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = distribute_tensor = None  # type: ignore[assignment,misc]

__all__ = ["METHODS", "QUANTILE_SAMPLES", "TERNGRAD_CLAMP_SIGMA", "GradientQuantizer", "QuantizationStats",
           "block_scales", "check_error_feedback", "check_int", "decode", "derive_seed", "encode", "levels_for_bits",
           "quantize", "relative_error", "resolve_levels"]

Method = Literal["stochastic", "qsgd", "terngrad", "sign"]
Rounding = Literal["stochastic", "nearest"]
METHODS: tuple[str, ...] = ("stochastic", "qsgd", "terngrad", "sign")
ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
TERNGRAD_CLAMP_SIGMA = 2.5
QUANTILE_SAMPLES = 1024
_MASK64 = (1 << 64) - 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys, in order, with the SplitMix64 finaliser (host integers only)."""
    state = 0
    for key in keys:
        z = (state ^ (int(key) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def levels_for_bits(bits: int) -> int:
    """Quantization levels on each side of zero for a signed ``bits``-bit code: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


def check_int(value: Any, name: str, low: int, high: Optional[int] = None) -> int:
    """``value`` if it is an integer in ``[low, high]``; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    return _check_number(value, name, expected, lambda v: low <= v and (high is None or v <= high), int)


def _check_number(value: Any, name: str, expected: str, valid: Callable[[Any], bool], kind: Any = (int, float)) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"Expected `{name}` to be {expected} but got {type(value).__name__}")
    if not valid(value):
        raise ValueError(f"Expected `{name}` to be {expected} but got {value!r}")
    return value


def resolve_levels(method: str, bits: Optional[int], levels: Optional[int]) -> int:
    """The levels on each side of zero, after checking the three together: ``bits`` (2 to 8, default 8) applies to
    ``"stochastic"`` and ``"qsgd"`` (the default of ``levels``), ``levels`` to ``"qsgd"``; the others have one."""
    if method not in METHODS:
        raise ValueError(f"Expected `method` to be one of {METHODS} but got {method!r}")
    if bits is not None:
        check_int(bits, "bits", 2, 8)
        if method in ("terngrad", "sign"):
            raise ValueError(f"`bits` does not apply to method={method!r} (one level) but got bits={bits}")
    if levels is not None:
        check_int(levels, "levels", 1)
        if method != "qsgd":
            raise ValueError(f"`levels` applies to method='qsgd' only but got levels={levels} with method={method!r}")
        if bits is not None:
            raise ValueError(f"Expected at most one of `bits` and `levels` for 'qsgd' but got {bits} and {levels}")
        return levels
    return 1 if method in ("terngrad", "sign") else levels_for_bits(8 if bits is None else bits)


def check_error_feedback(method: str, error_feedback: Any) -> Optional[bool]:
    """``error_feedback`` (``None``: the caller's default) if it is a bool or ``None`` that ``method`` accepts."""
    if error_feedback is not None and not isinstance(error_feedback, bool):
        raise TypeError(f"Expected `error_feedback` to be a bool or None but got {type(error_feedback).__name__}")
    if method == "sign" and error_feedback is False:
        raise ValueError("method='sign' always uses error feedback but got error_feedback=False")
    return error_feedback


def block_scales(blocks: Tensor, method: str) -> Tensor:
    """The scale of each row of ``blocks``: ``max|x|`` (stochastic, terngrad), ``||x||`` (qsgd), ``mean|x|`` (sign).
    NaN or Inf for a row that is not finite (or whose norm overflows)."""
    if method == "qsgd":
        return torch.linalg.vector_norm(blocks, dim=1)
    if method == "sign":
        return blocks.abs().mean(1)
    return torch.maximum(blocks.amax(1), blocks.amin(1).neg())  # max|x| without a copy of |x|


def encode(blocks: Tensor, method: str, levels: int, *, scales: Optional[Tensor] = None,
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Integer codes in ``[-levels, levels]`` (a float tensor) and the scale of each row of the 2-D ``blocks``
    (default: :func:`block_scales`): ``y = x * levels / scale`` rounded stochastically, ``floor(y + u)`` with ``u``
    uniform in ``[0, 1)`` from ``generator``, or without one to nearest (ties to even). ``"sign"`` codes are the sign
    bits (``-1`` for negative values and ``-0.0``). The codes of a row that is not finite mean nothing."""
    if scales is None:
        scales = block_scales(blocks, method)
    if method == "sign":
        return torch.copysign(blocks.new_ones(()), blocks), scales
    column = scales.unsqueeze(1)
    multiplier = levels / torch.where(column > 0, column, 1.0)  # a zero row has codes 0 with any scale: 1 avoids 0 / 0
    if generator is None:
        codes = torch.mul(blocks, multiplier).round_()
    else:  # E[floor(y + u)] = y
        codes = torch.rand(blocks.shape, generator=generator, dtype=blocks.dtype, device=blocks.device)
        codes.addcmul_(blocks, multiplier).floor_()
    # |y| <= levels up to the rounding of the multiplier: the clamp keeps every code in range
    return codes.clamp_(-levels, levels), scales


def decode(codes: Tensor, scales: Tensor, levels: int, *, out: Optional[Tensor] = None) -> Tensor:
    """The values of :func:`encode`'s ``codes``, ``codes * scale / levels`` per row, into ``out`` (may be ``codes``)."""
    return torch.mul(codes, (scales / levels).unsqueeze(1), out=out)


def relative_error(error_sq: Tensor, input_sq: Tensor) -> Tensor:
    """``||Q(p) - p|| / ||p||`` from the squares of both (0 for ``p = 0``: the clamp)."""
    return (error_sq / input_sq.clamp(min=torch.finfo(input_sq.dtype).tiny)).sqrt()


@dataclass
class QuantizationStats:
    """One call's device scalars: squared error and input norm (after the outlier bound), clamped and total elements."""

    error_sq: Tensor
    input_sq: Tensor
    clamped: Tensor
    numel: Tensor

    @property
    def rel_error(self) -> Tensor:
        return relative_error(self.error_sq, self.input_sq)

    @property
    def clamped_fraction(self) -> Tensor:
        return self.clamped / self.numel.clamp(min=1)


class _Layout:
    """Where a group's tensors sit in its ``(rows, block_size)`` buffer: each from a row boundary, zero-padded to the
    next. The index tensors are built once: a host-to-device copy per step would stall an accelerator."""

    def __init__(self, shapes: list[torch.Size], block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the compute dtype
        self.shapes, self.block_size = [tuple(s) for s in shapes], block_size  # view() takes tuples faster
        self.sizes = [math.prod(s) for s in shapes]
        blocks = [-(-n // block_size) for n in self.sizes]
        self.rows = sum(blocks)
        self.pieces = [k for n, b in zip(self.sizes, blocks) for k in (n, b * block_size - n)]  # tensor, padding, ...
        zeros = torch.zeros(block_size, dtype=dtype, device=device)
        self.pads = [zeros[:k] for k in self.pieces[1::2]]
        self.blocks = torch.tensor(blocks, device=device)
        self.segment = torch.arange(len(blocks)).repeat_interleave(torch.tensor(blocks)).to(device)
        self.numel = torch.tensor(self.sizes, dtype=dtype, device=device)
        bounds = torch.tensor([0, *itertools.accumulate(self.pieces)]).unsqueeze(1)  # where each piece starts
        self.starts, self.last = bounds[:-1:2].to(device), (bounds[1::2] - 1).clamp(min=0).to(device)
        self.generator = torch.Generator(device=device)  # seeded at every call

    def buffer(self, tensors: Sequence[Optional[Tensor]]) -> Tensor:
        """A copy of ``tensors`` (``None``: zeros) in this layout, in the compute dtype."""
        flat = [self.pads[0].new_zeros(n) if t is None else t.reshape(-1) for t, n in zip(tensors, self.sizes)]
        return torch.cat([piece for pair in zip(flat, self.pads) for piece in pair]).view(self.rows, self.block_size)

    def views(self, buffer: Tensor) -> list[Tensor]:
        return [piece.view(shape) for piece, shape in zip(buffer.view(-1).split(self.pieces)[::2], self.shapes)]

    def per_block(self, per_tensor: Tensor) -> Tensor:
        return per_tensor.index_select(0, self.segment)

    def per_tensor(self, per_block: Tensor, reduce: str) -> Tensor:
        # deterministic on every device, unlike an index_add_, so that replicas agree bitwise; `unsafe` skips a check
        # that reads the lengths back to the host
        return torch.segment_reduce(per_block, reduce, lengths=self.blocks, unsafe=True, initial=0)

    def norms(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """The norm of each row of ``blocks`` and the squared norm of each tensor."""
        rows = torch.linalg.vector_norm(blocks, dim=1)
        return rows, self.per_tensor(rows.square(), "sum")


class GradientQuantizer:
    r"""Quantize lists of gradients in place, with optional error feedback, for any training loop.

    Args:
        method: ``"stochastic"``, ``"qsgd"``, ``"terngrad"`` or ``"sign"`` (formulas in the module docstring).
        bits: code width of ``"stochastic"``, 2 to 8 (default 8); for ``"qsgd"`` the default of ``levels``.
        levels: ``s`` of ``"qsgd"`` only (default: ``2**(bits-1) - 1``).
        block_size: elements per block, one scale each (``"stochastic"``, ``"qsgd"``), from each tensor's start.
        rounding: ``"stochastic"`` (unbiased, the default) or ``"nearest"`` (ties to even); not for ``"sign"``.
        error_feedback: carry ``p - Q(p)`` to the next call; default on for ``"sign"`` (always), off otherwise.
        clamp_sigma: clamp ``|g|`` per tensor to this many root mean squares (default 2.5 for ``"terngrad"``).
        clamp_quantile: clamp ``|g|`` per tensor to this quantile of ``|g|``, in ``(0, 1]``; not with ``clamp_sigma``.
        seed: base seed: the draws of a call depend only on ``(seed, step, stream)``.

    Raises:
        TypeError, ValueError: for arguments of the wrong type, out of range, or that do not apply to ``method``.

    Example::

        >>> quantizer = GradientQuantizer("sign")
        >>> grads = [torch.tensor([0.5, -1.0, 0.25, 2.0])]
        >>> stats = quantizer.quantize_(grads, step=0)
        >>> grads[0]
        tensor([ 0.9375, -0.9375,  0.9375,  0.9375])
        >>> quantizer.residuals()["0"]
        tensor([-0.4375, -0.0625, -0.6875,  1.0625])
    """

    def __init__(self, method: Method = "stochastic", bits: Optional[int] = None, levels: Optional[int] = None,
                 block_size: int = 2048, rounding: Optional[Rounding] = None, error_feedback: Optional[bool] = None,
                 clamp_sigma: Optional[float] = None, clamp_quantile: Optional[float] = None, seed: int = 0) -> None:
        self.levels = resolve_levels(method, bits, levels)
        self.method = method
        self.block_size = check_int(block_size, "block_size", 1)
        if rounding not in (None, *ROUNDINGS):
            raise ValueError(f"Expected `rounding` to be one of {ROUNDINGS} but got {rounding!r}")
        if method == "sign" and rounding is not None:
            raise ValueError(f"method='sign' has no rounding step but got rounding={rounding!r}")
        self.rounding = rounding or "stochastic"
        self.error_feedback = bool(check_error_feedback(method, error_feedback)) or method == "sign"
        if clamp_sigma is not None:
            _check_number(clamp_sigma, "clamp_sigma", "a positive finite number or None", lambda v: 0 < v < math.inf)
        if clamp_quantile is not None:
            _check_number(clamp_quantile, "clamp_quantile", "a number in (0, 1] or None", lambda v: 0 < v <= 1)
        self.clamp_sigma = None if clamp_sigma is None else float(clamp_sigma)
        self.clamp_quantile = None if clamp_quantile is None else float(clamp_quantile)
        if self.clamp_sigma is not None and self.clamp_quantile is not None:
            raise ValueError(f"Expected at most one of `clamp_sigma` and `clamp_quantile` but got {clamp_sigma} and"
                             f" {clamp_quantile}")
        if method == "terngrad" and self.clamp_sigma is None and self.clamp_quantile is None:
            self.clamp_sigma = TERNGRAD_CLAMP_SIGMA
        self.seed = check_int(seed, "seed", 0)
        self._layouts: dict[tuple, _Layout] = {}  # by the device, dtype and shapes of a group's tensors
        self._residuals: dict[int, dict[str, Tensor]] = {}  # stream -> name -> local residual (compute dtype)
        self._specs: dict[int, dict[str, Optional[tuple]]] = {}  # stream -> name -> DTensor spec of the gradient
        self._pending: dict[int, dict[str, Tensor]] = {}  # loaded from a checkpoint (full tensors), not imported

    def quantize_(self, tensors: Sequence[Optional[Tensor]], step: int, *, names: Optional[Sequence[str]] = None,
                  stream: int = 0) -> QuantizationStats:
        """Quantize ``tensors`` in place (a ``DTensor``'s local shard; ``None``: skipped, its residual dropped).
        ``step`` and ``stream`` (one per optimizer) seed the draws; ``names`` key the residuals (default: positions)."""
        names = [str(i) for i in range(len(tensors))] if names is None else list(names)
        groups: dict[tuple, list[tuple[str, Tensor]]] = {}
        specs = self._specs[stream] = {}
        for name, t in zip(names, tensors):
            if t is not None:
                local, spec = as_local_tensor(t), _spec(t)
                specs[name] = spec
                groups.setdefault((local.device, local.dtype, spec[4] if spec else ()), []).append((name, local))
        old, pending = self._residuals.pop(stream, {}), self._pending.pop(stream, {})
        residuals = self._residuals[stream] = {}
        device = next(iter(groups))[0] if groups else torch.device("cpu")  # where the statistics are summed
        parts = []
        for index, ((group_device, dtype, coordinate), group) in enumerate(groups.items()):
            locals_ = [t for _, t in group]
            key = (group_device, dtype, *(t.shape for t in locals_))
            if key not in self._layouts:
                self._layouts[key] = _Layout([t.shape for t in locals_], self.block_size, group_device, dtype)
            layout = self._layouts[key]
            carried = [_carried(n, old, pending, specs[n], t) for n, t in group] if self.error_feedback else None
            layout.generator.manual_seed(derive_seed(self.seed, step, stream, index, *coordinate))
            stats, new = self._quantize_group(layout, locals_, carried)
            if new is not None:
                residuals.update(zip([n for n, _ in group], layout.views(new)))
            parts.append(stats.to(device, torch.float32))
        return QuantizationStats(*sum(parts, torch.zeros(4, device=device)).unbind())

    def _quantize_group(self, layout: _Layout, tensors: list[Tensor], carried: Optional[list[Optional[Tensor]]]
                        ) -> tuple[Tensor, Optional[Tensor]]:
        """One group in place: ``[error_sq, input_sq, clamped, numel]`` and the new residual buffer (or ``None``)."""
        x = layout.buffer(tensors)
        residual = layout.buffer(carried) if carried is not None else None
        if layout.rows == 0:  # only empty shards (FSDP2 with fewer rows than ranks): nothing to quantize
            return x.new_zeros(4), residual
        p = x if residual is None else x + residual
        row_norms, input_sq = layout.norms(p)
        ok_tensor = torch.isfinite(input_sq)
        ok = layout.per_block(ok_tensor).unsqueeze(1)
        clamped = x.new_zeros(())
        bound = self._outlier_bound(layout, input_sq, p)
        if bound is not None:
            # a non-finite tensor gets an infinite bound: clamping counts and changes nothing there
            bound = layout.per_block(torch.where(ok_tensor, bound, math.inf)).unsqueeze(1)
            clamped = (p.abs() > bound).sum().to(x.dtype)
            p = p.clamp(-bound, bound) if p is x else p.clamp_(-bound, bound)  # x keeps the non-finite tensors
            row_norms, input_sq = layout.norms(p)
        scales = row_norms if self.method == "qsgd" else None
        if self.method == "terngrad":  # one scale per tensor: its max|p|
            scales = layout.per_block(layout.per_tensor(block_scales(p, "terngrad"), "max"))
        elif self.method == "sign":  # one scale per tensor: its mean|p|, from the means of its rows
            means = layout.per_tensor(block_scales(p, "sign"), "sum") * self.block_size / layout.numel.clamp(min=1)
            scales = layout.per_block(means)
        dither = layout.generator if self.rounding == "stochastic" and self.method != "sign" else None
        codes, scales = encode(p, self.method, self.levels, scales=scales, generator=dither)
        q = decode(codes, scales, self.levels, out=codes)
        if q.dtype != tensors[0].dtype:
            q = q.to(tensors[0].dtype).to(q.dtype)  # the residual and the error refer to what the optimizer sees
        torch.where(ok, q, x, out=q)  # the non-finite tensors as they were
        torch._foreach_copy_(tensors, layout.views(q))
        error = p.sub_(q)  # p is x or a buffer of its own: neither is needed any more
        squares = torch.where(ok_tensor, torch.stack([layout.norms(error)[1], input_sq]), 0.0).sum(1)
        stats = torch.cat([squares, clamped.view(1), (layout.numel * ok_tensor).sum().view(1)])
        return stats, (torch.where(ok, error, residual, out=error) if residual is not None else None)

    def _outlier_bound(self, layout: _Layout, input_sq: Tensor, p: Tensor) -> Optional[Tensor]:
        """Per tensor: ``clamp_sigma`` root mean squares, or ``clamp_quantile`` of ``QUANTILE_SAMPLES`` draws of |p|."""
        if self.clamp_sigma is not None:
            return self.clamp_sigma * (input_sq / layout.numel.clamp(min=1)).sqrt()
        if self.clamp_quantile is None:
            return None
        u = torch.rand(len(layout.sizes), QUANTILE_SAMPLES, generator=layout.generator, dtype=p.dtype, device=p.device)
        # u * n may round up to n: the last element caps each tensor's samples (an empty tensor's are never used)
        index = torch.minimum(layout.starts + (u * layout.numel.unsqueeze(1)).long(), layout.last)
        samples = torch.take(p, index).abs()
        return samples.kthvalue(max(1, math.ceil(self.clamp_quantile * QUANTILE_SAMPLES)), dim=1).values

    def residuals(self, stream: int = 0) -> dict[str, Tensor]:
        """Copies of the error-feedback residuals of ``stream`` (local shards), by tensor name."""
        current = {**self._pending.get(stream, {}), **self._residuals.get(stream, {})}
        return {name: t.clone() for name, t in current.items()}

    def state_dict(self) -> dict[str, Any]:
        """``seed`` and the residuals as full tensors by stream and name (under FSDP2 a collective: on every rank)."""
        residuals: dict[int, dict[str, Tensor]] = {s: dict(p) for s, p in self._pending.items()}
        for stream, by_name in self._residuals.items():
            specs = self._specs[stream]
            residuals.setdefault(stream, {}).update({n: _full_tensor(r, specs[n]) for n, r in by_name.items()})
        return {"seed": self.seed, "residuals": residuals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self._pending = {int(s): dict(r) for s, r in state_dict.get("residuals", {}).items()}
        self._residuals.clear()  # the loaded ones are imported at the next call, sliced to this rank's shard


def _spec(t: Tensor) -> Optional[tuple]:
    """What turns the local shard of a ``DTensor`` back into the full tensor, and this rank's coordinate on the mesh
    dimensions along which it is sharded (replicated ones left out: replicas of a shard draw alike)."""
    if DTensor is None or not isinstance(t, DTensor):
        return None
    coordinate = t.device_mesh.get_coordinate() or []
    shard = tuple(int(coordinate[d]) for d, placement in enumerate(t.placements) if placement.is_shard())
    return t.device_mesh, tuple(t.placements), t.shape, t.stride(), shard


def _full_tensor(local: Tensor, spec: Optional[tuple]) -> Tensor:
    if spec is None:
        return local.clone()
    mesh, placements, shape, stride, _ = spec
    return DTensor.from_local(local, mesh, placements, shape=shape, stride=stride).full_tensor()


def _carried(name: str, old: dict, pending: dict, spec: Optional[tuple], local: Tensor) -> Optional[Tensor]:
    """The residual of ``name`` (or ``None``): the last call's, or a loaded full tensor sliced to this rank's shard
    (under FSDP2 a collective, taken by every rank in the same order)."""
    value = old.get(name)
    if value is None and name in pending:
        value = pending[name].to(local.device)
        if spec is not None:
            value = distribute_tensor(value, spec[0], list(spec[1])).to_local()
    if value is not None and value.shape != local.shape:
        warnings.warn(f"GradientQuantizer: the saved residual of {name!r} has shape {tuple(value.shape)} but the"
                      f" gradient has shape {tuple(local.shape)}; its error feedback restarts from zero.")
        return None
    return value


def quantize(tensor: Tensor, method: Method = "stochastic", *, step: int = 0, **options: Any) -> Tensor:
    """``Q(tensor)`` out of place: one step of a fresh :class:`GradientQuantizer` with ``options``.

    Example::

        >>> quantize(torch.tensor([0.5, -1.0, 0.26, 0.0]), bits=3, rounding="nearest")
        tensor([ 0.6667, -1.0000,  0.3333,  0.0000])
    """
    out = tensor.detach().clone()
    GradientQuantizer(method, **options).quantize_([out], step)
    return out
