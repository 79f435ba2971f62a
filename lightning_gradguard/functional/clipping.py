"""Gradient clipping rules as plain PyTorch, without a host sync: fixed and adaptive.

Rules (``g``: gradients, ``n``: global L2 norm; references in brackets):

- ``"norm"``: ``g <- g * min(1, max_norm / n)`` [``torch.nn.utils.clip_grad_norm_``].
- ``"value"``: ``g_i <- clamp(g_i, -clip_value, clip_value)`` [``torch.nn.utils.clip_grad_value_``].
- ``"quantile"``: the threshold is the ``quantile`` of the last ``history_length`` norms [AutoClip, Seetharaman et
  al. 2020; the ``autoclip`` package's ``QuantileClip(global_threshold=True)``].
- ``"zscore"``: EMA mean and variance of the norm; a norm whose z-score exceeds ``z_thresh`` is clipped to
  ``mean + z_thresh * std / (z / z_thresh)`` (``"adaptive_scaling"``) or to ``mean``; the EMA takes the clipped
  norm [ZClip, Kumar et al. 2025; the ``zclip`` package].
- ``"agc"``: unit-wise (rows of a weight, a whole bias): ``g_u <- g_u * min(1, factor * max(|W_u|, eps) / |g_u|)``
  [Brock et al. 2021, NFNets; timm's ``adaptive_clip_grad``].
- ``"adagc"``: per tensor, ``g_i <- g_i * min(1, factor * gamma_i / |g_i|)`` and
  ``gamma_i <- beta * gamma_i + (1 - beta) * |clipped g_i|`` [AdaGC, Wang et al. 2025].

What this module adds to the references:

- **Nothing reads a device value back.** Thresholds, statistics and coefficients stay device tensors; decisions
  are ``torch.where`` / ``clamp``; gradients are scaled with one ``torch._foreach_mul_`` per (device, dtype) group.
- **Non-finite steps are left alone.** When the global norm is NaN or Inf the coefficient is 1 (the gradients are
  left for a guard or AMP's scaler to deal with) and no statistic is updated; a finite gradient is never made
  non-finite (every coefficient is finite and in ``[0, 1]``).
- **A safe start** for the adaptive rules (``quantile``, ``zscore``, ``adagc``) instead of an unclipped warm-up (ZClip
  without its absolute cap lets early spikes through; autoclip does not clip its first step). During the first
  ``warmup_steps`` finite steps the threshold is ``warmup_threshold`` (1.0, ZClip's default absolute cap), lowered
  to ``warmup_factor`` (3) times the (lower) median of the norms it let through. A spike, even on the second step,
  is clipped and never enters that median. The rule proper then starts from the norms as the warm-up clipped them
  (ZClip's EMA takes clipped norms): with ``zscore`` and ``adagc``, a run whose norms stayed above
  ``warmup_threshold`` throughout (a bad initialisation, a too-high learning rate) stays clipped near it, which is
  what rescues such runs; a run whose norms are legitimately larger needs ``warmup_threshold`` at their scale, or
  ``None``. ``warmup_factor=None``
  and ``warmup_threshold=None`` give the references' unclipped warm-up.
- **An absolute cap** ``max_norm`` on top of any rule (for ``"norm"`` it is the rule).

:class:`GradientClipper` holds a rule and its state for plain training loops; the callback
:class:`~lightning_gradguard.GradientClipping` drives the same class.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from lightning_gradguard.functional.detection import Finiteness
from lightning_gradguard.functional.norms import (
    Segments,
    _index_on,
    _norms_of,
    _reduce_sharded,
    _units,
    batches_by_shape,
    batching_on,
    grad_norms,
    local_shards,
    unit_norms,
    unit_values,
)
from lightning_gradguard.functional.stats import EmaMoments, RunningWindow
from lightning_gradguard.utilities import device_tensor, to_device

__all__ = [
    "DEFAULT_AGC_EXCLUDE",
    "METHODS",
    "ClipResult",
    "GradientClipper",
    "adagc_coefficients",
    "agc_coefficients",
    "clamp_",
    "clip_coefficient",
    "scale_",
    "unitwise_norms",
    "zscore_threshold",
]

Method = Literal["norm", "value", "quantile", "zscore", "agc", "adagc"]
ZScoreMode = Literal["adaptive_scaling", "mean"]
METHODS: tuple[str, ...] = ("norm", "value", "quantile", "zscore", "agc", "adagc")
_ZSCORE_MODES = ("adaptive_scaling", "mean")

DEFAULT_AGC_EXCLUDE: tuple[str, ...] = (r"(^|\.)(head|lm_head|classifier|fc)\.",)
"""Parameter-name patterns (``re.search``) that AGC leaves unclipped: the usual names of a classifier head. Brock
et al. found clipping the final linear layer hurts."""

_WARMUP_DEFAULTS = {"quantile": 25, "zscore": 25, "adagc": 100}  # ZClip's 25; AdaGC's public ports use 100


# ---------------------------------------------------------------------------------------------------------------
# the math, one step at a time
# ---------------------------------------------------------------------------------------------------------------


def clip_coefficient(norm: Tensor, threshold: Tensor, eps: float = 1e-6, finite: Optional[Tensor] = None) -> Tensor:
    """``min(1, threshold / (norm + eps))`` as in ``clip_grad_norm_``; 1 where ``norm`` is not finite.

    ``finite``: ``torch.isfinite(norm)``, when the caller has it already.

    Example::

        >>> import torch
        >>> clip_coefficient(torch.tensor([4.0, 0.5, float("nan")]), torch.tensor(1.0), eps=0.0)
        tensor([0.2500, 1.0000, 1.0000])
    """
    # fmin rather than `if coef < 1` (a host read) or a clamp: where one side is NaN fmin takes the other, so a NaN
    # coefficient (0/0 thresholds) comes out as 1, "no clip", in the same operation (on a GPU each saved operation is
    # a saved kernel launch, the cost of a step of small tensors)
    one = _ONE.on(norm.device)
    coef = torch.fmin(threshold / (norm + eps), one)
    # a non-finite norm is left to the guard or AMP's scaler
    return torch.where(torch.isfinite(norm) if finite is None else finite, coef, one)


def _groups(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
    """``{(device, dtype): (tensors, their indices)}``, grouped in C++ as ``clip_grad_norm_`` does."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    return {key: (lists[0], indices) for key, (lists, indices) in grouped.items()}  # type: ignore[misc]


def scale_(tensors: Sequence[Tensor], coef: Union[Tensor, Sequence[Tensor]]) -> None:
    """Multiply ``tensors`` in place by ``coef``: one 0-d tensor for all of them, or one tensor per tensor (each
    broadcastable to its tensor). One ``torch._foreach_mul_`` per (device, dtype) group.

    Example::

        >>> import torch
        >>> grads = [torch.ones(2), torch.ones(2, 2)]
        >>> scale_(grads, torch.tensor(0.5))
        >>> grads[1]
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    groups = _groups(tensors)
    if len(groups) == 1 and not isinstance(coef, Tensor):  # one device and dtype: the coefficients as they are
        ((group, _),) = groups.values()
        torch._foreach_mul_(group, list(coef))
        return
    for (device, _), (group, idx) in groups.items():
        if isinstance(coef, Tensor):
            torch._foreach_mul_(group, coef.to(device))
        else:
            torch._foreach_mul_(group, [coef[i].to(device) for i in idx])


class UnitScaler:
    """Scales tensors of fixed shapes in place by per-unit coefficients: ``counts[i]`` units for tensor ``i`` (its
    rows, or 1 for the whole tensor), laid out tensor after tensor in :attr:`coef`, which the caller writes each step.

    Each tensor is multiplied by its view of :attr:`coef` (made once), broadcast over it. On an accelerator a foreach
    multiply by broadcast factors leaves torch's fused path (which needs matching shapes and strides) for one launch
    per tensor, so tensors of one shape (`batches_by_shape`) are multiplied by dense factors instead: one gather
    and one expanding copy per batch, then one fused foreach. The products are the same bits either way."""

    def __init__(self, shapes: Sequence[torch.Size], counts: Sequence[int], device: torch.device) -> None:
        self.coef = torch.ones(sum(counts), dtype=torch.float32, device=device)
        view_shapes = [(c,) + (1,) * (len(s) - 1) if len(s) else () for s, c in zip(shapes, counts)]
        self.views = [p.view(v) for p, v in zip(self.coef.split(list(counts)), view_shapes)]
        starts = [0, *itertools.accumulate(counts)][:-1]
        self.batches: list[tuple[list[int], Tensor, tuple[int, ...], tuple[int, ...]]] = []
        for idx in batches_by_shape(device, shapes, range(len(shapes))):
            index = [starts[i] + j for i in idx for j in range(counts[i])]
            shape = (len(idx), *shapes[idx[0]])
            self.batches.append(
                (idx, device_tensor(index, dtype=torch.long, device=device), (len(idx), *view_shapes[idx[0]]), shape)
            )
        batched = {i for idx, *_ in self.batches for i in idx}
        self.alone = None if not batched else [i for i in range(len(shapes)) if i not in batched]
        self.alone_views = self.views if self.alone is None else [self.views[i] for i in self.alone]

    def scale_(self, tensors: Sequence[Tensor]) -> None:
        """Multiply ``tensors`` (of the shapes given at construction) in place by their coefficients."""
        for idx, index, coef_shape, shape in self.batches:
            dense = self.coef.index_select(0, index).view(coef_shape).expand(shape).contiguous()
            torch._foreach_mul_([tensors[i] for i in idx], list(dense.unbind(0)))
        rest = tensors if self.alone is None else [tensors[i] for i in self.alone]
        if rest:
            scale_(rest, self.alone_views)


def clamp_(tensors: Sequence[Tensor], bound: Tensor) -> None:
    """Clamp every element of ``tensors`` in place to ``[-bound, bound]`` (``bound``: a 0-d device tensor, so an
    infinite bound makes this a no-op without a host decision). Two foreach calls per (device, dtype) group."""
    clamp = _clamper(bound)
    for group, _ in _groups(tensors).values():
        clamp(group)


def _clamper(bound: Tensor) -> Callable[[list[Tensor]], None]:
    """An in-place clamp to ``[-bound, bound]`` of tensors of one device and dtype (the bound cast once for each)."""
    cast: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def clamp(tensors: list[Tensor]) -> None:
        first = tensors[0]
        bounds = cast.get((first.device, first.dtype))
        if bounds is None:
            hi = bound if bound.device == first.device else to_device(bound, first.device)
            hi = hi.to(first.dtype)
            bounds = cast[(first.device, first.dtype)] = (hi, -hi)
        hi, lo = bounds
        if len(tensors) == 1:  # a CPU tensor on its own (see `_local_norms`): no list to build
            torch.minimum(first, hi, out=first)
            torch.maximum(first, lo, out=first)
            return
        # torch has no foreach clamp to a tensor bound: min and max, where a 0-d tensor bound is one fast kernel
        # each (`clamp(min=Tensor, max=Tensor)` is a slower three-input kernel on the CPU)
        bounds_of = _BoundViews.of(tensors)
        if bounds_of is None:
            torch._foreach_minimum_(tensors, [hi] * len(tensors))
            torch._foreach_maximum_(tensors, [lo] * len(tensors))
            return
        # an accelerator: the fused foreach needs bounds shaped like the tensors, so the bounds are filled into
        # two small buffers that every batched tensor views (see `_BoundViews`)
        small, his, los, large = bounds_of.fill(hi, lo)
        torch._foreach_minimum_([tensors[i] for i in small], his)
        torch._foreach_maximum_([tensors[i] for i in small], los)
        if large:
            torch._foreach_minimum_([tensors[i] for i in large], [hi] * len(large))
            torch._foreach_maximum_([tensors[i] for i in large], [lo] * len(large))

    return clamp


class _BoundViews:
    """On an accelerator, per list of tensor shapes (cached): two buffers as long as the largest batched tensor
    (`batches_by_shape`), and for each batched tensor a view of each shaped like it, so a clamp to a device bound
    is two fused foreach calls after two fills, instead of one launch per tensor and bound."""

    _cache: dict[tuple, _BoundViews] = {}

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        shapes = [t.shape for t in tensors]
        batched = sorted(i for idx in batches_by_shape(tensors[0].device, shapes, range(len(shapes))) for i in idx)
        size = max((tensors[i].numel() for i in batched), default=0)
        self.hi = torch.empty(size, dtype=tensors[0].dtype, device=tensors[0].device)
        self.lo = torch.empty_like(self.hi)
        self.small = batched
        self.his = [self.hi[: tensors[i].numel()].view(shapes[i]) for i in batched]
        self.los = [self.lo[: tensors[i].numel()].view(shapes[i]) for i in batched]
        in_batch = set(batched)
        self.large = [i for i in range(len(shapes)) if i not in in_batch]

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> Optional[_BoundViews]:
        """The views for these tensors, or ``None`` where nothing is batched (on the CPU)."""
        first = tensors[0]
        if not batching_on(first.device):
            return None
        key = (first.device, first.dtype, tuple([t.shape for t in tensors]))
        views = cls._cache.get(key)
        if views is None:
            if len(cls._cache) > 16:
                cls._cache.clear()
            views = cls._cache[key] = cls(tensors)
        return views if views.small else None

    def fill(self, hi: Tensor, lo: Tensor) -> tuple[list[int], list[Tensor], list[Tensor], list[int]]:
        self.hi.fill_(hi)  # a 0-d device tensor: filled on the device, nothing read back
        self.lo.fill_(lo)
        return self.small, self.his, self.los, self.large


def zscore_threshold(
    norm: Tensor, mean: Tensor, var: Tensor, z_thresh: float, mode: ZScoreMode = "adaptive_scaling", eps: float = 1e-6
) -> Tensor:
    """ZClip's threshold for ``norm``, given the EMA ``mean`` and ``var`` of the past norms.

    With ``z = (norm - mean) / (std + eps)``: when ``z > z_thresh`` the norm is an outlier and the threshold is
    ``mean + z_thresh * std / (z / z_thresh)`` (``"adaptive_scaling"``: the larger the outlier, the harder the clip)
    or ``mean`` (``"mean"``). Otherwise it is the outlier boundary ``mean + z_thresh * (std + eps)``, which ``norm``
    does not exceed, so it is not clipped. Either way ``min(norm, threshold)`` is the clipped norm that ZClip feeds
    back into its EMA.

    Example::

        >>> import torch
        >>> zscore_threshold(torch.tensor(10.0), torch.tensor(1.0), torch.tensor(1.0), 2.5, eps=0.0)
        tensor(1.6944)
        >>> zscore_threshold(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(1.0), 2.5, eps=0.0)
        tensor(3.5000)
    """
    # ZClip's arithmetic, operation for operation, so the same inputs give its bits (fused forms such as addcdiv
    # would save kernels but round differently, and on an exploding run a last-bit difference grows)
    std = var.sqrt()
    z = (norm - mean) / (std + eps)
    outlier = mean + (z_thresh * std) / (z / z_thresh) if mode == "adaptive_scaling" else mean
    return torch.where(z > z_thresh, outlier, mean + z_thresh * (std + eps))


def unitwise_norms(tensor: Tensor) -> Tensor:
    """L2 norm of every unit of ``tensor``, float32: one per row (output unit, dim 0) of a weight with two or more
    dimensions, one for a bias or scalar. Works for ``Linear`` and ``ConvNd`` weights, whose outputs are on dim 0.

    Example::

        >>> import torch
        >>> unitwise_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([5., 1.])
        >>> unitwise_norms(torch.tensor([3.0, 4.0]))
        tensor([5.])
    """
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor, dtype=torch.float32).reshape(1)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), dtype=torch.float32)


def agc_coefficients(weight_norms: Tensor, grad_norms: Tensor, clip_factor: float = 0.01, eps: float = 1e-3) -> Tensor:
    """AGC's scale per unit: ``min(1, clip_factor * max(|W|, eps) / |g|)`` (timm's formula, ``|g|`` floored at 1e-6).

    The floor ``eps`` on the weight norm lets zero-initialised weights learn.

    Example::

        >>> import torch
        >>> agc_coefficients(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), clip_factor=0.01)
        tensor([1.0000e-02, 1.0000e-05])
    """
    return _agc_coef(grad_norms, _agc_limits(weight_norms, clip_factor, eps))


def _agc_limits(weight_norms: Tensor, clip_factor: float = 0.01, eps: float = 1e-3) -> Tensor:
    """AGC's largest allowed gradient norm per unit: ``clip_factor * max(|W|, eps)``."""
    return weight_norms.clamp(min=eps).mul_(clip_factor)


def _agc_coef(grad_norms: Tensor, limits: Tensor) -> Tensor:
    # min(1, limit / |g|): where |g| >= limit >= clip_factor * eps the floor on |g| is inactive, as in timm's
    # `where(|g| < limit, 1, limit / max(|g|, 1e-6))`; a NaN norm gives a NaN coefficient either way
    return (limits / grad_norms.clamp(min=1e-6)).clamp_(max=1.0)


def adagc_coefficients(norms: Tensor, gamma: Tensor, factor: float = 1.05) -> Tensor:
    """AdaGC's scale per tensor: ``min(1, factor * gamma / |g|)``; 1 for a zero gradient or an unset (inf) ``gamma``.

    Example::

        >>> import torch
        >>> adagc_coefficients(torch.tensor([2.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 1.0]), factor=1.0)
        tensor([0.5000, 1.0000, 1.0000])
    """
    # fmin takes 1 where the ratio is NaN (0/0, inf/inf); a zero norm gives inf, so 1 as well: three kernels
    return torch.fmin(factor * gamma / norms, _ONE.on(norms.device))


# ---------------------------------------------------------------------------------------------------------------
# rules with state
# ---------------------------------------------------------------------------------------------------------------


class ClipResult(NamedTuple):
    """What one clipping step did (device tensors, float32)."""

    total_norm: Tensor
    """global L2 norm before clipping"""
    clipped_norm: Tensor
    """global L2 norm after clipping"""
    threshold: Tensor
    """the threshold in force (see :class:`GradientClipper` for the per-unit rules)"""
    coef: Tensor
    """``clipped_norm / total_norm`` (1 for a zero or non-finite norm)"""


class _Step(Finiteness):
    """The gradients of one step as the rules see them."""

    def __init__(
        self,
        params: list[Tensor],
        names: list[str],
        grads: list[Tensor],
        local_grads: list[Tensor],
        per_tensor: Tensor,
        total: Tensor,
        units: Optional[Tensor] = None,
        finite: Optional[Tensor] = None,
    ) -> None:
        self.params = params
        self.names = names
        self.grads = grads
        self.local_grads = local_grads
        self.per_tensor = per_tensor
        self.total = total
        self.units = units  # unit-wise gradient norms (see `unit_norms`) when already computed
        self.finite = torch.isfinite(total) if finite is None else finite


class _Rule:
    """A clipping rule. Global rules return a threshold from :meth:`advance`; unit rules scale in :meth:`apply_`."""

    global_threshold = True

    def advance(self, step: _Step) -> Tensor:
        """The global threshold of this step; updates the statistics (finite steps only)."""
        raise NotImplementedError

    def apply_(self, step: _Step, eps: float) -> tuple[Tensor, Tensor]:
        """Clip in place; return ``(clipped global norm, threshold)``."""
        raise NotImplementedError

    def states(self) -> dict[str, Any]:
        """The stateful parts, by name (``RunningWindow`` / ``EmaMoments`` / tensors)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {key: part.state_dict() for key, part in self.states().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, part in self.states().items():
            if key in state_dict:
                part.load_state_dict(state_dict[key])

    def to(self, device: torch.device) -> None:
        for part in self.states().values():
            part.to(device)


class _WarmUp:
    """The safe start shared by the adaptive rules (see :class:`GradientClipper`).

    Two windows over the first ``steps`` finite steps: ``window`` holds every norm as the warm-up clipped it (what
    the rule proper starts from), ``evidence`` only the norms the warm-up threshold let through (what the
    threshold follows).
    """

    def __init__(self, steps: int, factor: Optional[float], threshold: Optional[float]) -> None:
        self.steps = steps
        self.factor = factor
        self.first_threshold = math.inf if threshold is None else float(threshold)  # a Python number: no sync
        self.window = RunningWindow(max(steps, 1))
        self.evidence = RunningWindow(max(steps, 1))
        # host-side hint that the warm-up is over (see GradientClipper.warmup_finished); only ever set from a value
        # read back elsewhere, never by reading here. The rules then skip the warm-up arithmetic, whose result
        # would be the same bits (every warm-up term is masked off once `active()` is False).
        self.over = steps == 0

    def active(self) -> Tensor:
        return self.window.count < self.steps

    def threshold(self) -> Tensor:
        """``warmup_threshold``, lowered to ``warmup_factor`` times the median of the norms let through so far."""
        first = torch.full((), self.first_threshold, device=self.window.values.device)
        if self.factor is None:
            return first
        relative = torch.minimum(first, self.factor * self.evidence.median())
        return torch.where(self.evidence.count > 0, relative, first)

    def record(self, norm: Tensor, finite: Tensor, threshold: Tensor) -> Tensor:
        """Record this step's norm (``threshold``: this step's warm-up threshold) while the warm-up lasts; return
        the norm as the warm-up clipped it."""
        recording = finite & self.active()
        clipped = torch.minimum(norm, threshold)
        self.window.append(clipped, recording)
        self.evidence.append(norm, recording & (norm <= threshold))
        return clipped

    def to(self, device: torch.device) -> None:
        self.window.to(device)
        self.evidence.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict(), "evidence": self.evidence.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.window.load_state_dict(state_dict.get("window", {}))
        self.evidence.load_state_dict(state_dict.get("evidence", {}))
        self.over = self.steps == 0  # the loaded state may be mid-warm-up: learn it again


class _Constant:
    """A fixed number as a 0-d device tensor, made once per device rather than every step (never written to)."""

    def __init__(self, value: float, dtype: torch.dtype = torch.float32) -> None:
        self.value = value
        self.dtype = dtype
        self._tensor: Optional[Tensor] = None

    def on(self, device: torch.device) -> Tensor:
        if self._tensor is None or self._tensor.device != device:
            dtype = torch.float32 if torch.device(device).type == "mps" else self.dtype  # MPS has no float64
            self._tensor = torch.full((), self.value, dtype=dtype, device=device)
        return self._tensor


_ONE = _Constant(1.0)
_ZERO = _Constant(0.0)


class _NormRule(_Rule):
    def __init__(self, max_norm: float) -> None:
        self.threshold = _Constant(max_norm)

    def advance(self, step: _Step) -> Tensor:
        return self.threshold.on(step.total.device)


class _QuantileRule(_Rule):
    def __init__(self, quantile: float, history_length: int, warmup: _WarmUp) -> None:
        self.quantile = quantile
        self.history = RunningWindow(history_length)
        self.warmup = warmup

    def states(self) -> dict[str, Any]:
        return {"history": self.history, "warmup": self.warmup}

    def advance(self, step: _Step) -> Tensor:
        from_history = self.history.quantile(self.quantile)
        # an empty window's quantile is NaN (it holds finite values only, so nothing else is): no threshold yet
        from_history = from_history.nan_to_num(nan=math.inf, posinf=math.inf)
        if self.warmup.over:  # what the general path computes once the warm-up is over, without its masked terms
            self.history.append(step.total, step.finite)
            return from_history
        warm, warm_threshold = self.warmup.active(), self.warmup.threshold()
        threshold = torch.where(warm, torch.minimum(from_history, warm_threshold), from_history)
        clipped = self.warmup.record(step.total, step.finite, warm_threshold)
        # like autoclip, the history takes the norm before clipping; during the warm-up, as the warm-up clipped it
        self.history.append(torch.where(warm, clipped, step.total), step.finite)
        return threshold


class _ZScoreRule(_Rule):
    def __init__(self, alpha: float, z_thresh: float, mode: ZScoreMode, eps: float, warmup: _WarmUp) -> None:
        self.z_thresh = z_thresh
        self.mode = mode
        self.eps = eps
        self.ema = EmaMoments(alpha)
        self.warmup = warmup

    def states(self) -> dict[str, Any]:
        return {"ema": self.ema, "warmup": self.warmup}

    def advance(self, step: _Step) -> Tensor:
        ema_threshold = zscore_threshold(step.total, self.ema.mean, self.ema.var, self.z_thresh, self.mode, self.eps)
        if self.warmup.over:  # what the general path computes once the warm-up is over, without its masked terms
            self.ema.update(torch.minimum(step.total, ema_threshold), step.finite)
            return ema_threshold
        warm, warm_threshold = self.warmup.active(), self.warmup.threshold()
        threshold = torch.where(warm, warm_threshold, ema_threshold)
        self.warmup.record(step.total, step.finite, warm_threshold)
        # the step that fills the warm-up window starts the EMA from it, as ZClip does
        window = self.warmup.window
        self.ema.start(window.mean(), window.variance(), warm & ~self.warmup.active())
        # after the warm-up the EMA takes the clipped norm (ZClip): a spike moves it only up to its threshold
        self.ema.update(torch.minimum(step.total, ema_threshold), ~warm & step.finite)
        return threshold


class _ValueRule(_Rule):
    global_threshold = False

    def __init__(self, clip_value: float) -> None:
        self.threshold = _Constant(clip_value)  # reported, in float32 like every logged value
        self.bound = _Constant(clip_value, torch.float64)  # the clamp's bound: exact in every gradient dtype

    def apply_(self, step: _Step, eps: float) -> tuple[Tensor, Tensor]:
        threshold = self.threshold.on(step.total.device)
        bound = torch.where(step.finite, self.bound.on(step.total.device), math.inf)  # a non-finite step: as it is
        # the clamp is applied inside the norm pass, so that on the CPU each tensor is clamped and its clipped norm
        # taken while it is in cache
        return _norms_of(step.grads, step.local_grads, 2.0, step.total.device, _clamper(bound))[1], threshold


class _AgcLayout(NamedTuple):
    """How the units of one model's tensors line up (cached while names and local shapes stay the same)."""

    with_rows: list[int]  # tensors with rows (two or more dimensions)
    segments: Segments  # each tensor's units, twice over (`_global_norms` sums two values per unit)
    excluded: Optional[Tensor]  # for every unit, whether its tensor is excluded from AGC (None: none is)
    sharded: bool  # whether some tensor with rows is a DTensor (its per-tensor sums are partial)
    scaler: UnitScaler  # every unit's coefficient (`scaler.coef`, rewritten each step) and how it scales


class _AgcRule(_Rule):
    global_threshold = False

    def __init__(self, clip_factor: float, eps: float, exclude: Sequence[str]) -> None:
        self.clip_factor = clip_factor
        self.eps = eps
        self.patterns = [re.compile(p) for p in exclude]
        self._layout_key: Optional[tuple] = None
        self._layout: Optional[_AgcLayout] = None
        self._weight_buffers: dict = {}

    def _layout_of(self, step: _Step) -> _AgcLayout:
        key = (tuple(step.names), tuple([g.shape for g in step.local_grads]), step.total.device)
        if key != self._layout_key or self._layout is None:
            units, clipped = [], []
            for name, p, g in zip(step.names, step.params, step.local_grads):
                _check_row_sharding(name, p)
                n = g.shape[0] if g.ndim > 1 else 1
                units.append(n)
                clipped += [not any(p.search(name) for p in self.patterns)] * n
            device = step.total.device
            with_rows = [i for i, g in enumerate(step.local_grads) if g.ndim > 1]
            self._layout = _AgcLayout(
                with_rows,
                Segments(units + units, device),
                None if all(clipped) else device_tensor([not c for c in clipped], dtype=torch.bool, device=device),
                any(hasattr(step.params[i], "placements") for i in with_rows),
                UnitScaler([g.shape for g in step.local_grads], units, device),
            )
            self._layout_key = key
        return self._layout

    def apply_(self, step: _Step, eps: float) -> tuple[Tensor, Tensor]:
        layout = self._layout_of(step)
        # rows: FSDP2 shards on dim 0, so every rank holds whole rows and their norms are local; a bias is one
        # unit, its full-tensor norm (reduced over shards)
        with torch.no_grad():  # cheaper than a detached view per parameter
            # into this rule's reusable buffer: the weight norms are only used within this step
            weight_norms = _units(step.params, local_shards(step.params), step.total.device, self._weight_buffers)[0]
        grad_units = step.units if step.units is not None else unit_values(step.grads, device=step.total.device)
        max_norm = _agc_limits(weight_norms, self.clip_factor, self.eps)  # also the threshold's limits below
        coef = _agc_coef(grad_units, max_norm)
        # into the layout's buffer, whose per-tensor views (made once) broadcast over the gradients
        one = _ONE.on(coef.device)
        if layout.excluded is None:
            torch.where(step.finite, coef, one, out=layout.scaler.coef)
        else:  # an excluded unit, or any unit of a non-finite step, keeps its gradient as it is
            torch.where(layout.excluded | step.nonfinite, one, coef, out=layout.scaler.coef)
        layout.scaler.scale_(step.local_grads)
        # exact norms from the units (each was scaled as a whole): no second pass over the gradients. The threshold
        # reported is the global norm a gradient has when every clipped unit sits exactly at its limit.
        limits = max_norm if layout.excluded is None else max_norm.masked_fill(layout.excluded, 0.0)
        clipped_norm, threshold = self._global_norms(
            step, layout, torch.stack([grad_units * layout.scaler.coef, limits])
        )
        return clipped_norm, threshold

    @staticmethod
    def _global_norms(step: _Step, layout: _AgcLayout, unit_values: Tensor) -> Tensor:
        """Global L2 norms of rows of per-unit values; the local rows of sharded tensors are summed over shards."""
        if not layout.sharded:  # every unit is whole on every rank: one reduction
            return torch.linalg.vector_norm(unit_values, dim=1)
        per_tensor_sq = layout.segments.sum(unit_values.square().reshape(-1)).view(unit_values.shape[0], -1)
        index = _index_on(layout.with_rows, unit_values.device)
        local = per_tensor_sq.index_select(1, index).sqrt()
        items = [step.params[i] for i in layout.with_rows] * unit_values.shape[0]
        full = _reduce_sharded(items, local.reshape(-1), 2.0).reshape(local.shape)
        per_tensor_sq = per_tensor_sq.index_copy(1, index, full.square())
        return per_tensor_sq.sum(dim=1).sqrt()


def _check_row_sharding(name: str, param: Tensor) -> None:
    """AGC's row norms are local only when a sharded weight is split along dim 0 (FSDP2's default)."""
    placements = getattr(param, "placements", ())
    if param.ndim > 1 and any(p.is_shard() and p.dim != 0 for p in placements):
        raise ValueError(
            f"Expected parameter {name!r} to be replicated or sharded on dim 0 for method='agc' but got placements"
            f" {tuple(placements)}"
        )


class _AdaGCRule(_Rule):
    global_threshold = False

    def __init__(self, beta: float, factor: float, warmup: _WarmUp) -> None:
        self.beta = beta
        self.factor = factor
        self.warmup = warmup
        self.names: list[str] = []
        self.gamma = torch.zeros(0)  # per tensor, in the order of `names`; inf until a nonzero norm is seen
        self._index_key: Optional[tuple] = None
        self._index: Optional[Tensor] = None
        self._scaler_key: Optional[tuple] = None
        self._scaler: Optional[UnitScaler] = None

    def states(self) -> dict[str, Any]:
        return {"warmup": self.warmup}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "names": list(self.names), "gamma": self.gamma.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "gamma" in state_dict:
            self.names = list(state_dict.get("names", []))
            self.gamma = state_dict["gamma"].to(device=self.gamma.device, dtype=torch.float32).clone()
            self._index_key = None

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.gamma = to_device(self.gamma, device)
        if self._index is not None:
            self._index = to_device(self._index, device)

    def _index_of(self, step: _Step) -> Tensor:
        """Where each of this step's tensors keeps its gamma (tensors are matched by name across steps)."""
        key = tuple(step.names)
        if key != self._index_key:
            known = set(self.names)
            new = [n for n in step.names if n not in known]
            if new:
                self.names += new
                fill = torch.full((len(new),), math.inf, device=self.gamma.device)
                self.gamma = torch.cat([to_device(self.gamma, fill.device), fill])
            position = {n: i for i, n in enumerate(self.names)}
            self._index = device_tensor([position[n] for n in step.names], dtype=torch.long, device=self.gamma.device)
            self._index_key = key
        return self._index  # type: ignore[return-value]

    def _scaler_of(self, step: _Step) -> UnitScaler:
        """One coefficient per tensor, scaling it whole (cached while the local shapes stay the same)."""
        key = (tuple([g.shape for g in step.local_grads]), step.total.device)
        if key != self._scaler_key or self._scaler is None:
            self._scaler = UnitScaler(list(key[0]), [1] * len(key[0]), step.total.device)
            self._scaler_key = key
        return self._scaler

    def apply_(self, step: _Step, eps: float) -> tuple[Tensor, Tensor]:
        index = self._index_of(step)
        gamma = self.gamma.index_select(0, index)
        coef = adagc_coefficients(step.per_tensor, gamma, self.factor)
        over = self.warmup.over  # host hint: the warm-up terms below would all be masked off
        if not over:
            warm = self.warmup.active()
            warm_threshold = self.warmup.threshold()
            # warm-up: plain global clipping (AdaGC clips at an absolute lambda_abs here; the safe start instead)
            global_coef = clip_coefficient(step.total, warm_threshold, eps)
            coef = torch.where(warm, global_coef.expand_as(gamma), coef)
        scaler = self._scaler_of(step)
        coef = torch.where(step.finite, coef, _ONE.on(coef.device), out=scaler.coef)
        scaler.scale_(step.local_grads)
        clipped = step.per_tensor * coef  # exact: each tensor was scaled as a whole; full-tensor under FSDP2
        # an unset (inf) gamma starts from the norm (the EMA's arithmetic as written, not a `lerp`, which rounds
        # differently)
        updated = torch.where(torch.isinf(gamma), clipped, self.beta * gamma + (1 - self.beta) * clipped)
        if not over:
            updated = torch.where(warm, torch.minimum(gamma, clipped), updated)
        # a zero gradient says nothing about a tensor's scale: its gamma stays as it was
        informative = step.finite & (step.per_tensor > 0)
        self.gamma = self.gamma.index_copy(0, index, torch.where(informative, updated, gamma))
        limits = self.factor * gamma
        # the unset (inf) limits count as 0; a limit is >= 0, so below inf exactly when finite
        threshold = torch.linalg.vector_norm(torch.where(limits < math.inf, limits, _ZERO.on(limits.device)))
        if not over:
            self.warmup.record(step.total, step.finite, warm_threshold)
            threshold = torch.where(warm, warm_threshold, threshold)
        return torch.linalg.vector_norm(clipped), threshold


# ---------------------------------------------------------------------------------------------------------------
# the public engine
# ---------------------------------------------------------------------------------------------------------------


def _number(value: Any, name: str, *, low: float = 0.0, high: float = math.inf, closed: str = "()") -> float:
    """``value`` as a float inside the interval, or a ``ValueError``/``TypeError`` naming ``name``."""
    lo_ok = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    interval = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number in {interval} but got {type(value).__name__} {value!r}")
    if math.isnan(value) or not (lo_ok(value) and hi_ok(value)):
        raise ValueError(f"Expected `{name}` to be a number in {interval} but got {value!r}")
    return float(value)


def _optional_number(value: Any, name: str, **kwargs: Any) -> Optional[float]:
    return None if value is None else _number(value, name, **kwargs)


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum} but got {value!r}")
    return value


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"Expected `agc_exclude` to be a sequence of regular expressions but got {value!r}")
    patterns = tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"Expected `agc_exclude` to hold strings but got {type(p).__name__} {p!r}")
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"Expected `agc_exclude` to hold valid regular expressions but got {p!r}: {err}") from err
    return patterns


class GradientClipper:
    r"""Clip gradients in place with one of six rules, keeping the rule's statistics on the device.

    For plain PyTorch loops: call :meth:`clip_` between ``loss.backward()`` and ``optimizer.step()``. It never reads
    a device value back to the host.

    Args:
        method: ``"agc"`` (default), ``"norm"``, ``"value"``, ``"quantile"``, ``"zscore"`` or ``"adagc"`` (module
            docstring). ``"agc"`` excludes parameters by name: pass ``names`` to :meth:`clip_`.
        max_norm: absolute cap on the global L2 norm, applied on top of any rule (``None``: no cap). Required by
            ``"norm"``, for which it is the threshold.
        clip_value: ``"value"`` only: the bound on each element's magnitude.
        quantile: ``"quantile"``: which quantile of the history is the threshold, in ``(0, 1]``.
        history_length: ``"quantile"``: how many past norms the history keeps.
        alpha: ``"zscore"``: EMA weight of the past, in ``(0, 1)``.
        z_thresh: ``"zscore"``: z-score above which a norm is clipped.
        zscore_mode: ``"zscore"``: ``"adaptive_scaling"`` (clip harder the larger the outlier) or ``"mean"``.
        agc_factor: ``"agc"``: the ratio ``lambda`` of gradient to weight norm allowed per unit.
        agc_eps: ``"agc"``: floor on the weight norm, so zero-initialised weights still learn.
        agc_exclude: ``"agc"``: regular expressions; parameters whose name matches one are not clipped
            (default: a classifier head named ``head``, ``lm_head``, ``classifier`` or ``fc``).
        adagc_beta: ``"adagc"``: EMA weight of the past for the per-tensor norm, in ``[0, 1)``.
        adagc_factor: ``"adagc"``: the relative threshold ``lambda_rel`` (a tensor may grow by this factor).
        warmup_steps: adaptive rules: the length of the safe start, in finite steps; ``None`` picks the reference
            default (``quantile`` 25, ``zscore`` 25 as in ZClip, ``adagc`` 100 as in AdaGC). ``zscore`` starts its
            EMA from these steps' clipped norms; ``adagc`` clips globally during them.
        warmup_factor: during the warm-up the threshold is at most this multiple of the median of the norms it let
            through (``None``: no relative limit).
        warmup_threshold: the warm-up threshold before that, and its upper bound (``None``: unbounded).
        eps: added to the norm in ``threshold / (norm + eps)``, as in ``clip_grad_norm_``.

    The threshold reported for ``"value"`` is ``clip_value``; for ``"agc"`` and ``"adagc"`` it is the global norm of
    the per-unit limits (a gradient with every clipped unit exactly at its limit has that norm); ``max_norm`` caps
    it in every case.

    Raises:
        ValueError / TypeError: for an unknown method, an argument out of range, or a missing ``max_norm``
            (``"norm"``) or ``clip_value`` (``"value"``).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = GradientClipper("zscore")
        >>> for _ in range(3):
        ...     model(torch.randn(8, 4)).pow(2).sum().backward()
        ...     result = clipper.clip_(model.parameters())
        ...     model.zero_grad()
        >>> sorted(result._fields)
        ['clipped_norm', 'coef', 'threshold', 'total_norm']
        >>> bool(result.clipped_norm <= result.threshold)
        True
    """

    def __init__(
        self,
        method: Method = "agc",
        *,
        max_norm: Optional[float] = None,
        clip_value: Optional[float] = None,
        quantile: float = 0.9,
        history_length: int = 1000,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        zscore_mode: ZScoreMode = "adaptive_scaling",
        agc_factor: float = 0.01,
        agc_eps: float = 1e-3,
        agc_exclude: Sequence[str] = DEFAULT_AGC_EXCLUDE,
        adagc_beta: float = 0.98,
        adagc_factor: float = 1.05,
        warmup_steps: Optional[int] = None,
        warmup_factor: Optional[float] = 3.0,
        warmup_threshold: Optional[float] = 1.0,
        eps: float = 1e-6,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"Expected `method` to be one of {METHODS} but got {method!r}")
        if zscore_mode not in _ZSCORE_MODES:
            raise ValueError(f"Expected `zscore_mode` to be one of {_ZSCORE_MODES} but got {zscore_mode!r}")
        self.method = method
        self.max_norm = _optional_number(max_norm, "max_norm")
        self.eps = _number(eps, "eps", closed="[)")
        if method == "norm" and self.max_norm is None:
            raise ValueError("Expected `max_norm` to be a positive number for method='norm' but got None")
        if (method == "value") != (clip_value is not None):
            expected = "a positive number for method='value'" if method == "value" else f"None for method={method!r}"
            raise ValueError(f"Expected `clip_value` to be {expected} but got {clip_value!r}")
        if warmup_steps is None:
            warmup_steps = _WARMUP_DEFAULTS.get(method, 0)
        minimum = 1 if method in ("zscore", "adagc") else 0  # both start their statistics from the warm-up
        warmup = _WarmUp(
            _count(warmup_steps, "warmup_steps", minimum),
            _optional_number(warmup_factor, "warmup_factor", low=1.0, closed="[)"),
            _optional_number(warmup_threshold, "warmup_threshold", closed="(]"),
        )
        # every argument is checked whatever the method, so a typo in an unused one does not pass silently
        quantile = _number(quantile, "quantile", closed="(]", high=1.0)
        history_length = _count(history_length, "history_length", 1)
        alpha, z_thresh = _number(alpha, "alpha", high=1.0), _number(z_thresh, "z_thresh")
        agc_factor, agc_eps, agc_exclude = _number(agc_factor, "agc_factor"), _number(agc_eps, "agc_eps"), _patterns(
            agc_exclude
        )
        adagc_beta = _number(adagc_beta, "adagc_beta", closed="[)", high=1.0)
        adagc_factor = _number(adagc_factor, "adagc_factor")
        self._rule: _Rule
        if method == "norm":
            self._rule = _NormRule(self.max_norm)  # type: ignore[arg-type]
        elif method == "value":
            self._rule = _ValueRule(_number(clip_value, "clip_value"))
        elif method == "quantile":
            self._rule = _QuantileRule(quantile, history_length, warmup)
        elif method == "zscore":
            self._rule = _ZScoreRule(alpha, z_thresh, zscore_mode, self.eps, warmup)
        elif method == "agc":
            self._rule = _AgcRule(agc_factor, agc_eps, agc_exclude)
        else:
            self._rule = _AdaGCRule(adagc_beta, adagc_factor, warmup)
        self._device: Optional[torch.device] = None
        # the absolute cap; not for "norm", whose threshold it already is
        self._cap = None if self.max_norm is None or method == "norm" else _Constant(self.max_norm)

    def clip_(
        self,
        parameters: Iterable[Tensor],
        *,
        names: Optional[Sequence[str]] = None,
        per_tensor_norms: Optional[Tensor] = None,
        total_norm: Optional[Tensor] = None,
        local_grads: Optional[Sequence[Tensor]] = None,
        unit_grad_norms: Optional[Tensor] = None,
        grads: Optional[Sequence[Tensor]] = None,
        finite: Optional[Tensor] = None,
    ) -> ClipResult:
        """Clip the gradients of ``parameters`` in place and update the rule's statistics.

        Args:
            parameters: parameters; those without a gradient are skipped.
            names: one name per parameter (``"agc"`` exclusion, ``"adagc"`` per-tensor state); default
                ``param_<i>``.
            per_tensor_norms, total_norm: the L2 norms of the gradients (of the parameters that have one), if
                already computed (e.g. for logging); computed here otherwise.
            local_grads: the local shards of those gradients (the gradients themselves unless sharded), if already
                at hand: every parameter must then have a gradient.
            unit_grad_norms: ``"agc"``: the unit-wise norms of those gradients (``unit_norms(grads).units``), if
                already computed. For ``"agc"`` without any norms given, one pass computes unit-wise, per-tensor
                and global norms together.
            grads: the gradients of ``parameters`` (``p.grad`` each), if already gathered, together with
                ``local_grads``.
            finite: ``torch.isfinite(total_norm)``, if already computed, together with ``total_norm``.
        """
        params = parameters if isinstance(parameters, list) else list(parameters)
        names = [f"param_{i}" for i in range(len(params))] if names is None else names
        if len(names) != len(params):
            raise ValueError(f"Expected one name per parameter ({len(params)}) but got {len(names)}")
        if local_grads is None:
            with_grad = [(p, n) for p, n in zip(params, names) if p.grad is not None]
            params, names = [p for p, _ in with_grad], [n for _, n in with_grad]
        if grads is None or local_grads is None:
            grads = [p.grad for p in params]  # type: ignore[misc]
        local = local_shards(grads) if local_grads is None else local_grads
        if per_tensor_norms is None or total_norm is None:
            finite = None  # it would describe a norm that is not the one computed here
            if self.method == "agc" and grads:  # the rows' norms give the tensors' norms: one pass for both
                unit_grad_norms, per_tensor_norms, total_norm, _ = unit_norms(grads)
            else:
                per_tensor_norms, total_norm = grad_norms(grads)
        if not params:
            nothing = torch.full_like(total_norm, math.inf)
            return ClipResult(total_norm, total_norm, nothing, torch.ones_like(total_norm))
        if self._device != total_norm.device:
            self._rule.to(total_norm.device)
            self._device = total_norm.device
        return self._clip(_Step(params, names, grads, local, per_tensor_norms, total_norm, unit_grad_norms, finite))

    def _clip(self, step: _Step) -> ClipResult:
        cap = None if self._cap is None else self._cap.on(step.total.device)
        if self._rule.global_threshold:
            threshold = self._rule.advance(step)
            if cap is not None:
                threshold = torch.minimum(threshold, cap)
            coef = clip_coefficient(step.total, threshold, self.eps, finite=step.finite)
            scale_(step.local_grads, coef)
            return ClipResult(step.total, step.total * coef, threshold, coef)
        clipped, threshold = self._rule.apply_(step, self.eps)
        if cap is not None:
            cap_coef = clip_coefficient(clipped, cap, self.eps)
            scale_(step.local_grads, cap_coef)
            clipped, threshold = clipped * cap_coef, torch.minimum(threshold, cap)
        # a zero gradient (0/0) has coefficient 1, as has a non-finite step
        coef = torch.where(step.finite, torch.nan_to_num(clipped / step.total, nan=1.0), _ONE.on(clipped.device))
        return ClipResult(step.total, torch.where(step.finite, clipped, step.total), threshold, coef)

    @property
    def warmup_steps(self) -> int:
        """Length of the safe start, in finite steps (0 for a rule without one)."""
        warmup = getattr(self._rule, "warmup", None)
        return 0 if warmup is None else warmup.steps

    def warmup_active(self) -> Optional[Tensor]:
        """Device bool: whether the safe start is still on (``None`` for a rule without one, or once
        :meth:`warmup_finished` was called). Nothing is read back here."""
        warmup = getattr(self._rule, "warmup", None)
        if warmup is None or warmup.over:
            return None
        return warmup.active()

    def warmup_finished(self) -> None:
        """Tell the clipper that :meth:`warmup_active` was read back as ``False`` (e.g. at a logging flush that
        reads device values anyway). The warm-up cannot restart, so from then on the rule skips its warm-up
        arithmetic: the results are the same bits, a few dozen small device operations per step cheaper.
        Calling it while the warm-up is still on would end the safe start early; :meth:`load_state_dict` clears
        it."""
        warmup = getattr(self._rule, "warmup", None)
        if warmup is not None:
            warmup.over = True

    def state_dict(self) -> dict[str, Any]:
        """The rule's statistics (tensors), enough for a resumed run to take the same decisions."""
        return {"method": self.method, "rule": self._rule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        method = state_dict.get("method", self.method)
        if method != self.method:
            raise ValueError(f"Expected a state dict of method {self.method!r} but got one of {method!r}")
        self._rule.load_state_dict(state_dict.get("rule", {}))
        self._device = None  # move the loaded state to the gradients' device at the next step
