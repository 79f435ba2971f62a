"""Low-bit gradient quantizers with error feedback, without host syncs.

- ``"stochastic"``: per block, ``Q(g) = round_stochastic(g / max|g| * L) * max|g| / L`` with ``L = 2**(bits-1) - 1``
  levels on each side of zero. Unbiased.
- ``"qsgd"`` (Alistarh et al., 2017): the block's L2 norm as scale and ``L = s`` levels. Unbiased.
- ``"terngrad"`` (Wen et al., 2017): per tensor, clip to ``+-2.5 sigma``, then ``max|g| * sign(g) *
  Bernoulli(|g| / max|g|)``. Unbiased on the clipped gradient.
- ``"sign"`` (Karimireddy et al., 2019): per tensor ``mean|p|`` times the sign bit, always with error feedback.

Error feedback: ``p = g + e`` is quantized and ``e <- p - Q(p)`` carried over, so over ``T`` calls ``sum(Q) = sum(g)
- e_T``. An outlier bound (``clamp_sigma``, or ``clamp_quantile`` estimated from ``QUANTILE_SAMPLES`` elements per
tensor) clamps ``p`` first; what it removes is dropped, not fed back. The tensors of a (device, dtype, shard) group
share one zero-padded ``(blocks, block_size)`` buffer, each from a block boundary. Draws are seeded with
:func:`derive_seed` of ``(seed, step, stream, group, shard coordinate)``: DDP replicas draw alike, FSDP2 shards
independently, a resumed run as the uninterrupted one. Non-finite tensors are left untouched and keep their residual.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
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
           "quantize", "resolve_levels", "shard_coordinate"]

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
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be {expected} but got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"Expected `{name}` to be {expected} but got {value!r}")
    return value


def _check_real(value: Any, name: str, expected: str, valid: bool) -> Optional[float]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"Expected `{name}` to be {expected} or None but got {type(value).__name__}")
    if value is not None and not valid:
        raise ValueError(f"Expected `{name}` to be {expected} or None but got {value!r}")
    return None if value is None else float(value)


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


def shard_coordinate(t: Tensor) -> tuple[int, ...]:
    """This rank's coordinate on the mesh dimensions along which the ``DTensor`` ``t`` is sharded (``()`` for a plain
    tensor; replicated dimensions are left out, so that replicas of a shard draw alike)."""
    if DTensor is None or not isinstance(t, DTensor):
        return ()
    coordinate = t.device_mesh.get_coordinate() or []
    return tuple(int(coordinate[d]) for d, placement in enumerate(t.placements) if placement.is_shard())


def block_scales(blocks: Tensor, method: str) -> Tensor:
    """The scale of each row of ``blocks``: ``max|x|`` (stochastic, terngrad), ``||x||`` (qsgd), ``mean|x|`` (sign).
    NaN or Inf for a row that is not finite (or whose norm overflows)."""
    if method == "qsgd":
        return torch.linalg.vector_norm(blocks, dim=1)
    if method == "sign":
        return torch.linalg.vector_norm(blocks, 1, dim=1) / max(blocks.shape[1], 1)
    return blocks.abs().amax(1)


def encode(blocks: Tensor, method: str, levels: int, *, scales: Optional[Tensor] = None,
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Integer codes in ``[-levels, levels]`` (a float tensor) and the scale of each row of the 2-D ``blocks``
    (default: :func:`block_scales`). ``"sign"`` codes are ``-1`` for negative values, ``+1`` otherwise. With a
    ``generator``, stochastic rounding ``floor(y + u)``, ``u`` uniform in ``[0, 1)``; else to nearest, ties to even.

    Example::

        >>> codes, scales = encode(torch.tensor([[0.5, -1.0, 0.26, 0.0]]), "stochastic", 1)
        >>> codes, scales, decode(codes, scales, 1)
        (tensor([[ 0., -1.,  0.,  0.]]), tensor([1.]), tensor([[ 0., -1.,  0.,  0.]]))
    """
    if scales is None:
        scales = block_scales(blocks, method)
    if method == "sign":  # a zero counts as positive: one bit per element
        return torch.sign(blocks).add_(blocks == 0), scales
    column = scales.unsqueeze(1)
    # a zero row quantizes to zero with any scale: 1 avoids 0 / 0
    y = blocks * (levels / torch.where(column > 0, column, 1.0))
    if generator is None:
        codes = y.round()
    else:
        codes = y.add_(torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)).floor_()
    # |y| <= levels up to the rounding of the multiplier: the clamp keeps every code in range
    return codes.clamp_(-levels, levels), scales


def decode(codes: Tensor, scales: Tensor, levels: int) -> Tensor:
    """The values of :func:`encode`'s ``codes``: ``codes * scale / levels`` per row (NaN where a scale is NaN)."""
    return codes * (scales / levels).unsqueeze(1)


@dataclass
class QuantizationStats:
    """Device scalars of one call over the tensors quantized: squared error and input norm, elements clamped, elements
    quantized."""

    error_sq: Tensor
    input_sq: Tensor
    clamped: Tensor
    numel: Tensor

    @property
    def rel_error(self) -> Tensor:
        """``||Q(p) - p|| / ||p||``, ``p`` the input after the outlier bound (0 for ``p = 0``: the clamp)."""
        return (self.error_sq / self.input_sq.clamp(min=torch.finfo(self.input_sq.dtype).tiny)).sqrt()

    @property
    def clamped_fraction(self) -> Tensor:
        return self.clamped / self.numel.clamp(min=1)


class _Layout:
    """Where a group's tensors sit in its ``(blocks, block_size)`` view; index tensors built once (a host-to-device
    copy per step would stall an accelerator)."""

    def __init__(self, shapes: list[torch.Size], block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.block_size = block_size
        blocks = [-(-n // block_size) for n in self.sizes]
        self.rows = sum(blocks)
        starts = [0, *itertools.accumulate(b * block_size for b in blocks[:-1])]
        self.segment = torch.tensor([i for i, b in enumerate(blocks) for _ in range(b)], dtype=torch.long).to(device)
        self.starts = torch.tensor(starts).to(device)
        self.numel = torch.tensor(self.sizes, dtype=dtype).to(device)

    def views(self, buffer: Tensor) -> list[Tensor]:
        pieces = buffer.view(-1).split([-(-n // self.block_size) * self.block_size for n in self.sizes])
        return [piece[:n].view(shape) for piece, n, shape in zip(pieces, self.sizes, self.shapes)]

    def per_block(self, per_tensor: Tensor) -> Tensor:
        return per_tensor.index_select(0, self.segment)


def _norms(tensors: list[Tensor], ord: float = 2.0) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, ord))


class GradientQuantizer:
    r"""Quantize lists of gradients in place, with optional error feedback, for any training loop.

    Args:
        method: ``"stochastic"``, ``"qsgd"``, ``"terngrad"`` or ``"sign"`` (formulas in the module docstring).
        bits: code width of ``"stochastic"``, 2 to 8 (default 8); for ``"qsgd"`` the default of ``levels``.
        levels: ``s`` of ``"qsgd"`` only (default: ``2**(bits-1) - 1``).
        block_size: elements per block (the scale block of ``"stochastic"``, the norm bucket of ``"qsgd"``).
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
        sigma_ok = isinstance(clamp_sigma, (int, float)) and math.isfinite(clamp_sigma) and clamp_sigma > 0
        self.clamp_sigma = _check_real(clamp_sigma, "clamp_sigma", "a positive finite number", sigma_ok)
        quantile_ok = isinstance(clamp_quantile, (int, float)) and 0 < clamp_quantile <= 1
        self.clamp_quantile = _check_real(clamp_quantile, "clamp_quantile", "a number in (0, 1]", quantile_ok)
        if self.clamp_sigma is not None and self.clamp_quantile is not None:
            raise ValueError(f"Expected at most one of `clamp_sigma` and `clamp_quantile` but got {clamp_sigma} and"
                             f" {clamp_quantile}")
        if method == "terngrad" and self.clamp_sigma is None and self.clamp_quantile is None:
            self.clamp_sigma = TERNGRAD_CLAMP_SIGMA
        self.seed = check_int(seed, "seed", 0)
        self._layouts: dict[tuple, _Layout] = {}  # by the shapes, dtype and device of a group's tensors
        self._residuals: dict[int, dict[str, Tensor]] = {}  # stream -> name -> local residual (compute dtype)
        self._specs: dict[int, dict[str, Optional[tuple]]] = {}  # stream -> name -> DTensor spec of the gradient
        self._pending: dict[int, dict[str, Tensor]] = {}  # loaded from a checkpoint (full tensors), not imported
        self._generators: dict[torch.device, torch.Generator] = {}

    def quantize_(self, tensors: Sequence[Optional[Tensor]], step: int, *, names: Optional[Sequence[str]] = None,
                  stream: int = 0) -> QuantizationStats:
        """Quantize ``tensors`` in place (a ``DTensor``'s local shard; ``None`` entries are skipped and lose their
        residual) and return the statistics. ``step`` and ``stream`` (one per optimizer: own draws, own residuals)
        determine the draws; ``names`` key the residuals (default: the positions)."""
        names = [str(i) for i in range(len(tensors))] if names is None else list(names)
        items = [(n, t, as_local_tensor(t)) for n, t in zip(names, tensors) if t is not None]
        groups: dict[tuple, list[int]] = {}
        for i, (_, t, local) in enumerate(items):
            groups.setdefault((local.device, local.dtype, shard_coordinate(t)), []).append(i)
        old, pending = self._residuals.pop(stream, {}), self._pending.pop(stream, {})
        residuals = self._residuals[stream] = {}
        self._specs[stream] = {n: _spec(t) for n, t, _ in items}
        parts = []
        for index, (key, idx) in enumerate(groups.items()):
            group_names, locals_ = [items[i][0] for i in idx], [items[i][2] for i in idx]
            if self.error_feedback:
                carried = [_carried(n, old, pending, self._specs[stream][n], t) for n, t in zip(group_names, locals_)]
            layout = self._layout(locals_)
            generator = self._generators.setdefault(key[0], torch.Generator(device=key[0]))
            generator.manual_seed(derive_seed(self.seed, step, stream, index, *key[2]))
            stats, new = self._quantize_group(layout, locals_, carried if self.error_feedback else None, generator)
            if new is not None:
                residuals.update(zip(group_names, layout.views(new)))
            parts.append(stats)
        device = items[0][2].device if items else torch.device("cpu")
        totals = sum((p.to(device, torch.float32) for p in parts), torch.zeros(4, device=device))
        return QuantizationStats(*totals.unbind())

    def _layout(self, tensors: list[Tensor]) -> _Layout:
        signature = tuple((t.shape, t.dtype, t.device) for t in tensors)
        if signature not in self._layouts:
            compute = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
            self._layouts[signature] = _Layout([t.shape for t in tensors], self.block_size, tensors[0].device, compute)
        return self._layouts[signature]

    def _quantize_group(self, layout: _Layout, tensors: list[Tensor], carried: Optional[list], generator: Any
                        ) -> tuple[Tensor, Optional[Tensor]]:
        """One group in place: ``[error_sq, input_sq, clamped, numel]`` and the new residual buffer (or ``None``)."""
        compute = layout.numel.dtype
        x = torch.zeros(layout.rows, self.block_size, dtype=compute, device=tensors[0].device)
        if layout.rows == 0:  # only empty shards (FSDP2 with fewer rows than ranks): nothing to quantize
            return torch.zeros(4, dtype=compute, device=x.device), (x if carried is not None else None)
        torch._foreach_copy_(layout.views(x), tensors)
        residual = torch.zeros_like(x) if carried is not None else None
        if carried is not None:
            pairs = [(view, r) for view, r in zip(layout.views(residual), carried) if r is not None]
            if pairs:
                torch._foreach_copy_(*map(list, zip(*pairs)))
        p = x + residual if residual is not None else x  # x itself is not needed after the copy out
        norms = _norms(layout.views(p))
        ok_tensor = torch.isfinite(norms)
        ok = layout.per_block(ok_tensor).unsqueeze(1)
        clamped = torch.zeros((), dtype=compute, device=x.device)
        bound = self._outlier_bound(layout, norms, p, generator)
        if bound is not None:
            # non-finite tensors get an infinite bound: clamping leaves them as they are
            bound = layout.per_block(torch.where(ok_tensor, bound, math.inf)).unsqueeze(1)
            clamped = torch.where(ok, p.abs() > bound, False).sum().to(compute)
            p = torch.minimum(torch.maximum(p, -bound), bound)
            norms = _norms(layout.views(p))
        scales = None
        if self.method == "terngrad":  # one scale per tensor: its largest element after clipping
            scales = layout.per_block(_norms(layout.views(p), math.inf))
        elif self.method == "sign":  # one scale per tensor: its mean |p|
            scales = layout.per_block(_norms(layout.views(p), 1.0) / layout.numel.clamp(min=1))
        dither = generator if self.rounding == "stochastic" and self.method != "sign" else None
        codes, scales = encode(p, self.method, self.levels, scales=scales, generator=dither)
        q = decode(codes, scales, self.levels)
        if tensors[0].dtype != compute:
            q = q.to(tensors[0].dtype).to(compute)  # the residual and the error refer to what the optimizer sees
        torch._foreach_copy_(tensors, layout.views(torch.where(ok, q, x)))
        error = p.sub_(q)
        errors = _norms(layout.views(error))
        squares = torch.where(ok_tensor, torch.stack([errors, norms]).square(), 0.0).sum(1)
        quantized = (layout.numel * ok_tensor).sum()
        stats = torch.cat([squares, clamped.view(1), quantized.view(1)])
        return stats, (torch.where(ok, error, residual) if residual is not None else None)

    def _outlier_bound(self, layout: _Layout, norms: Tensor, p: Tensor, generator: Any) -> Optional[Tensor]:
        if self.clamp_sigma is not None:
            return self.clamp_sigma * norms / layout.numel.clamp(min=1).sqrt()
        if self.clamp_quantile is None:
            return None
        count = layout.numel.shape[0]
        u = torch.rand(count, QUANTILE_SAMPLES, generator=generator, dtype=torch.float64, device=p.device)
        last = (layout.numel.long() - 1).clamp(min=0).unsqueeze(1)
        offsets = torch.minimum((u * layout.numel.unsqueeze(1)).long(), last)  # u * n may round up to n
        # an empty tensor at the end of the buffer starts past its last element: its (unused) samples stay inside
        index = (layout.starts.unsqueeze(1) + offsets).clamp(max=max(p.numel() - 1, 0))
        samples = p.view(-1).index_select(0, index.view(-1)).view(count, QUANTILE_SAMPLES).abs()
        return samples.kthvalue(max(1, math.ceil(self.clamp_quantile * QUANTILE_SAMPLES)), dim=1).values

    def residuals(self, stream: int = 0) -> dict[str, Tensor]:
        """Copies of the error-feedback residuals of ``stream`` (local shards), by tensor name."""
        out = {name: t.clone() for name, t in self._pending.get(stream, {}).items()}
        out.update({name: t.clone() for name, t in self._residuals.get(stream, {}).items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """``seed`` and the residuals as full tensors by stream and name (under FSDP2 gathered: call it on every
        rank, as Lightning does when it saves)."""
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
    """What turns a local shard back into the full tensor (``None`` for a plain tensor)."""
    is_dtensor = DTensor is not None and isinstance(t, DTensor)
    return (t.device_mesh, tuple(t.placements), t.shape, t.stride()) if is_dtensor else None


def _full_tensor(local: Tensor, spec: Optional[tuple]) -> Tensor:
    if spec is None:
        return local.clone()
    mesh, placements, shape, stride = spec
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

        >>> quantize(torch.tensor([0.5, -1.0, 0.26, 0.0]), bits=2, rounding="nearest")
        tensor([ 0., -1.,  0.,  0.])
        >>> quantize(torch.tensor([0.5, -1.0, 0.26, 0.0]), bits=3, rounding="nearest")
        tensor([ 0.6667, -1.0000,  0.3333,  0.0000])
    """
    out = tensor.detach().clone()
    GradientQuantizer(method, **options).quantize_([out], step)
    return out
