"""Gradient clipping rules as plain PyTorch, fixed and adaptive, without a host sync.

Rules (``g``: the gradients, ``n``: their global L2 norm):

- ``"auto"`` (default): the threshold is the smaller of ``spike_factor`` times the EMA (weight ``alpha`` on the past)
  of the norms the optimizer got, and ``explosion_cap`` from the first step at which a ``torch.optim.SGD`` step
  ``lr * g`` would move some weight matrix by more than ``explosion_ratio`` times its norm (weights of norm below
  1e-3, zero-initialised, are not watched until they grow). A spike never raises the limit;
  Adam-like optimizers normalise the gradient, so for them only the spike limit acts.
- ``"norm"``: ``g <- g * min(1, max_norm / n)`` (``clip_grad_norm_``); ``"value"``: ``clamp(g, -c, c)``.
- ``"quantile"``: the ``quantile`` of the last ``history_length`` norms (AutoClip, Seetharaman et al. 2020).
- ``"zscore"``: EMA mean and variance of the norm; a norm ``z_thresh`` deviations above the mean is clipped to
  ``mean + z_thresh * std / (z / z_thresh)`` or to ``mean``; the EMA takes the clipped norm (ZClip, 2025).
- ``"agc"``: per unit (a row of a weight, a whole bias) ``g <- g * min(1, factor * max(|W|, eps) / |g|)``
  (Brock et al. 2021, NFNets; timm's ``adaptive_clip_grad``).
- ``"adagc"``: per tensor ``g_i <- g_i * min(1, factor * gamma_i / |g_i|)``, ``gamma_i`` an EMA of its clipped norm
  (AdaGC, Wang et al. 2025).

Beyond the references: thresholds, statistics and coefficients stay on the device (``torch.where``, ``fmin``); a
step whose norm is NaN or Inf is left as it is (coefficient 1, no statistic updated); ``quantile``, ``zscore`` and
``adagc`` start safely instead of unclipped (for ``warmup_steps`` finite steps the threshold is
``warmup_threshold``, lowered to ``warmup_factor`` times the median of the norms it let through); ``max_norm`` caps
any rule.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from lightning_gradguard.functional.norms import StepGradients, full_tensor_norms, grad_norms, unit_norms, units_of
from lightning_gradguard.functional.stats import EmaMoments, RunningWindow
from lightning_gradguard.utilities import to_device

__all__ = [
    "METHODS", "ClipResult", "GradientClipper", "adagc_coefficients", "agc_coefficients", "clamp_", "clip_coefficient",
    "output_layer", "scale_", "zscore_threshold",
]

Method = Literal["auto", "norm", "value", "quantile", "zscore", "agc", "adagc"]
ZScoreMode = Literal["adaptive_scaling", "mean"]
METHODS: tuple[str, ...] = ("auto", "norm", "value", "quantile", "zscore", "agc", "adagc")
_ZSCORE_MODES = ("adaptive_scaling", "mean")

# the arguments of each method, and their defaults when not given (``eps`` and ``max_norm`` apply to every method)
_WARMUP = {"warmup_steps": None, "warmup_factor": 3.0, "warmup_threshold": 1.0}
_ARGUMENTS: dict[str, dict[str, Any]] = {
    "auto": {"spike_factor": 4.0, "alpha": 0.95, "explosion_ratio": 2.0, "explosion_cap": 1.0},
    "norm": {},
    "value": {"clip_value": None},
    "quantile": {"quantile": 0.9, "history_length": 1000, **_WARMUP, "warmup_steps": 25},
    "zscore": {"alpha": 0.97, "z_thresh": 2.5, "zscore_mode": "adaptive_scaling", **_WARMUP, "warmup_steps": 25},
    "agc": {"agc_factor": 0.01, "agc_eps": 1e-3, "agc_exclude": None},
    "adagc": {"adagc_beta": 0.98, "adagc_factor": 1.05, **_WARMUP, "warmup_steps": 100},
}


def clip_coefficient(norm: Tensor, threshold: Tensor, eps: float = 1e-6, finite: Optional[Tensor] = None) -> Tensor:
    """``min(1, threshold / (norm + eps))`` as in ``clip_grad_norm_``; 1 where ``norm`` is not finite.

    Example::

        >>> import torch
        >>> clip_coefficient(torch.tensor([4.0, 0.5, float("nan")]), torch.tensor(1.0), eps=0.0)
        tensor([0.2500, 1.0000, 1.0000])
    """
    # fmin instead of `if coef < 1` (a host read): where one side is NaN (0/0 thresholds) it takes the other, 1
    coef = torch.fmin(threshold / (norm + eps), torch.ones_like(norm))
    return torch.where(torch.isfinite(norm) if finite is None else finite, coef, 1.0)


def scale_(tensors: Sequence[Tensor], coef: Tensor | Sequence[Tensor]) -> None:
    """Multiply ``tensors`` in place by ``coef``: one 0-d tensor for all of them, or one tensor per tensor
    (broadcastable to it). One ``torch._foreach_mul_`` per (device, dtype) group, as ``clip_grad_norm_``."""
    coefs = [coef] * len(tensors) if isinstance(coef, Tensor) else list(coef)
    grouped = _group_tensors_by_device_and_dtype([list(tensors), coefs], with_indices=False)
    for (device, _), ([group, factors], _) in grouped.items():  # type: ignore[misc]
        if isinstance(coef, Tensor):
            torch._foreach_mul_(group, coef.to(device))
        else:
            torch._foreach_mul_(group, [f.to(device) for f in factors])


def clamp_(tensors: Sequence[Tensor], bound: Tensor) -> None:
    """Clamp every element of ``tensors`` in place to ``[-bound, bound]``; ``bound`` is a 0-d device tensor, so an
    infinite bound leaves them as they are without a host decision."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=False)
    for (device, dtype), ([group], _) in grouped.items():  # type: ignore[misc]
        hi = bound.to(device).to(dtype)  # a move (none on the same device), then a cast
        torch._foreach_minimum_(group, [hi] * len(group))
        torch._foreach_maximum_(group, [-hi] * len(group))


def zscore_threshold(
    norm: Tensor, mean: Tensor, var: Tensor, z_thresh: float, mode: ZScoreMode = "adaptive_scaling", eps: float = 1e-6
) -> Tensor:
    """ZClip's threshold for ``norm``, given the EMA ``mean`` and ``var`` of the past norms.

    With ``z = (norm - mean) / (std + eps)``: when ``z > z_thresh`` the norm is an outlier and the threshold is
    ``mean + z_thresh * std / (z / z_thresh)`` (``"adaptive_scaling"``: the larger the outlier, the harder the clip)
    or ``mean`` (``"mean"``). Otherwise it is the outlier boundary ``mean + z_thresh * (std + eps)``, which ``norm``
    does not exceed. Either way ``min(norm, threshold)`` is the clipped norm ZClip feeds back into its EMA.

    Example::

        >>> import torch
        >>> zscore_threshold(torch.tensor(10.0), torch.tensor(1.0), torch.tensor(1.0), 2.5, eps=0.0)
        tensor(1.6944)
        >>> zscore_threshold(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(1.0), 2.5, eps=0.0)
        tensor(3.5000)
    """
    # ZClip's arithmetic, operation for operation: on an exploding run a last-bit difference grows
    std = var.sqrt()
    z = (norm - mean) / (std + eps)
    outlier = mean + (z_thresh * std) / (z / z_thresh) if mode == "adaptive_scaling" else mean
    return torch.where(z > z_thresh, outlier, mean + z_thresh * (std + eps))


def agc_coefficients(weight_norms: Tensor, grad_norms: Tensor, clip_factor: float = 0.01, eps: float = 1e-3) -> Tensor:
    """AGC's scale per unit: ``min(1, clip_factor * max(|W|, eps) / |g|)`` (timm's formula, ``|g|`` floored at 1e-6).
    The floor ``eps`` on the weight norm lets zero-initialised weights learn."""
    limits = weight_norms.clamp(min=eps) * clip_factor
    return (limits / grad_norms.clamp(min=1e-6)).clamp(max=1.0)


def adagc_coefficients(norms: Tensor, gamma: Tensor, factor: float = 1.05) -> Tensor:
    """AdaGC's scale per tensor: ``min(1, factor * gamma / |g|)``; 1 for a zero gradient or an unset (inf) ``gamma``."""
    # fmin takes 1 where the ratio is NaN (0/0, inf/inf); a zero norm gives inf, so 1 as well
    return torch.fmin(factor * gamma / norms, torch.ones_like(norms))


def output_layer(module: nn.Module) -> Optional[str]:
    """The name of the last module, in registration order, that holds parameters of its own: usually the output
    layer (a classifier head, an LM head), which AGC leaves unclipped. ``None`` if no module holds any.

    Example::

        >>> from torch import nn
        >>> output_layer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        '2'
    """
    last = None
    for name, child in module.named_modules():
        if next(child.parameters(recurse=False), None) is not None:
            last = name
    return last


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


class _Rule:
    """A clipping rule: a global threshold from :meth:`threshold`, or per-unit clipping in :meth:`clip_`."""

    per_unit = False

    def threshold(self, step: StepGradients) -> Tensor:
        """This step's global threshold; updates the statistics with finite norms only."""
        raise NotImplementedError

    def clip_(self, step: StepGradients) -> tuple[Tensor, Tensor]:
        """Clip in place; return ``(clipped global norm, threshold)``."""
        raise NotImplementedError

    def states(self) -> dict[str, Any]:
        """The stateful parts by name (objects with ``state_dict`` / ``load_state_dict`` / ``to``)."""
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


class _SafeStart:
    """The first ``steps`` finite steps of an adaptive rule (see :class:`GradientClipper`): ``window`` holds every
    norm as it clipped it (where the rule proper starts), ``evidence`` the norms it let through (what it follows)."""

    def __init__(self, steps: int, factor: float, threshold: float) -> None:
        self.steps, self.factor, self.first_threshold = steps, factor, threshold
        self.window = RunningWindow(max(steps, 1))
        self.evidence = RunningWindow(max(steps, 1))

    def active(self) -> Tensor:
        return self.window.count < self.steps

    def threshold(self) -> Tensor:
        """``warmup_threshold``, lowered to ``warmup_factor`` times the median of the norms let through so far."""
        first = torch.full((), self.first_threshold, device=self.window.values.device)
        if math.isinf(self.factor):
            return first
        relative = torch.minimum(first, self.factor * self.evidence.median())
        return torch.where(self.evidence.count > 0, relative, first)

    def record(self, norm: Tensor, finite: Tensor, threshold: Tensor) -> Tensor:
        """Record a norm while the safe start lasts; return it as the safe start clipped it."""
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


class _AutoRule(_Rule):
    """The default rule (module docstring): a spike limit relative to the run's own norms, and a cap from the first
    plain SGD step that would move a weight matrix by more than ``ratio`` times its norm."""

    def __init__(self, factor: float, alpha: float, ratio: float, cap: float) -> None:
        self.factor, self.alpha, self.ratio, self.cap = factor, alpha, ratio, cap
        self.mean, self.started, self.latched = torch.zeros(()), torch.tensor(False), torch.tensor(False)
        self._groups: tuple[tuple, list[Tensor]] = ((), [])  # per param group, where its tensors are in the step

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "started": self.started.clone(), "latched": self.latched.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("mean", "started", "latched"):
            if key in state_dict:
                setattr(self, key, torch.as_tensor(state_dict[key]).to(getattr(self, key).dtype).clone())

    def to(self, device: torch.device) -> None:
        self.mean, self.started, self.latched = (to_device(t, device) for t in (self.mean, self.started, self.latched))

    def threshold(self, step: StepGradients) -> Tensor:
        spike = torch.where(self.started, self.factor * self.mean, math.inf)
        explosive = self._explosive(step)
        threshold = torch.minimum(spike, torch.where(self.latched | explosive, self.cap, math.inf))
        # the EMA takes the norm the optimizer gets: a spike never raises the limit
        clipped = torch.minimum(step.total, threshold)
        ema = torch.where(self.started, self.alpha * self.mean + (1 - self.alpha) * clipped, clipped)
        self.mean = torch.where(step.finite, ema, self.mean)
        self.started = self.started | step.finite
        self.latched = self.latched | explosive
        return threshold

    def _explosive(self, step: StepGradients) -> Tensor:
        """Device bool: the plain SGD step ``lr * g`` of some weight matrix would exceed ``ratio`` times its norm. Only
        ``torch.optim.SGD``: Adam-like optimizers normalise the gradient. Per weight, so one exploding layer is not
        diluted by the others, and weights growing from a small start on a large gradient are not flagged."""
        optimizer = step.optimizer
        if optimizer is None:
            raise ValueError("method='auto' reads the optimizer's learning rate: pass `optimizer` to `clip_`")
        if not isinstance(optimizer, torch.optim.SGD):
            return torch.zeros((), dtype=torch.bool, device=step.device)
        with torch.no_grad():
            weights = grad_norms(step.params)[0]
        # the step of each tensor relative to its norm; zero-initialised weights (below 1e-3) are not watched
        relative = torch.where(weights > 1e-3, step.per_tensor / weights.clamp(min=1e-3), 0.0)
        groups = zip(optimizer.param_groups, self._where(step))
        largest = [(relative.index_select(0, i) * g["lr"]).amax() for g, i in groups if len(i)]  # len: a shape
        worst = torch.stack(largest).amax() if largest else torch.zeros((), device=step.device)
        return step.finite & (worst > self.ratio)

    def _where(self, step: StepGradients) -> list[Tensor]:
        """For each param group, the positions of its weights with two or more dimensions among the step's tensors
        (made once per set of tensors)."""
        key = (id(step.optimizer), tuple(id(p) for p in step.params))
        if key != self._groups[0]:
            position = {id(p): i for i, p in enumerate(step.params) if p.ndim > 1}
            members = [[position[id(p)] for p in g["params"] if id(p) in position] for g in step.optimizer.param_groups]
            self._groups = (key, [to_device(torch.tensor(m, dtype=torch.long), step.device) for m in members])
        return self._groups[1]


class _NormRule(_Rule):
    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def threshold(self, step: StepGradients) -> Tensor:
        return torch.full((), self.max_norm, device=step.device)


class _QuantileRule(_Rule):
    def __init__(self, quantile: float, history_length: int, warmup: _SafeStart) -> None:
        self.quantile = quantile
        self.history = RunningWindow(history_length)
        self.warmup = warmup

    def states(self) -> dict[str, Any]:
        return {"history": self.history, "warmup": self.warmup}

    def threshold(self, step: StepGradients) -> Tensor:
        # an empty history's quantile is NaN (it holds finite values only): no threshold yet
        from_history = self.history.quantile(self.quantile).nan_to_num(nan=math.inf)
        warm, warm_threshold = self.warmup.active(), self.warmup.threshold()
        threshold = torch.where(warm, torch.minimum(from_history, warm_threshold), from_history)
        clipped = self.warmup.record(step.total, step.finite, warm_threshold)
        # like autoclip, the history takes the norm before clipping; during the safe start, as it clipped it
        self.history.append(torch.where(warm, clipped, step.total), step.finite)
        return threshold


class _ZScoreRule(_Rule):
    def __init__(self, alpha: float, z_thresh: float, mode: ZScoreMode, eps: float, warmup: _SafeStart) -> None:
        self.z_thresh = z_thresh
        self.mode = mode
        self.eps = eps
        self.ema = EmaMoments(alpha)
        self.warmup = warmup

    def states(self) -> dict[str, Any]:
        return {"ema": self.ema, "warmup": self.warmup}

    def threshold(self, step: StepGradients) -> Tensor:
        ema_threshold = zscore_threshold(step.total, self.ema.mean, self.ema.var, self.z_thresh, self.mode, self.eps)
        warm, warm_threshold = self.warmup.active(), self.warmup.threshold()
        self.warmup.record(step.total, step.finite, warm_threshold)
        # the step that fills the safe start's window starts the EMA from it, as ZClip does
        window = self.warmup.window
        self.ema.start(window.mean(), window.variance(), warm & ~self.warmup.active())
        # after the safe start the EMA takes the clipped norm (ZClip): a spike moves it only up to its threshold
        self.ema.update(torch.minimum(step.total, ema_threshold), ~warm & step.finite)
        return torch.where(warm, warm_threshold, ema_threshold)


class _ValueRule(_Rule):
    per_unit = True

    def __init__(self, clip_value: float) -> None:
        self.clip_value = clip_value

    def clip_(self, step: StepGradients) -> tuple[Tensor, Tensor]:
        # float64 so the bound is exact in every gradient dtype; infinite on a non-finite step: left as it is
        value = torch.full((), self.clip_value, dtype=torch.float64, device=step.device)
        bound = torch.where(step.finite, value, math.inf)
        clamp_(step.local_grads, bound)
        return grad_norms(step.grads)[1], torch.full((), self.clip_value, device=step.device)


class _AgcLayout(NamedTuple):
    """How one model's units line up (made once per list of names and local shapes)."""

    counts: list[int]  # units per tensor
    shapes: list[tuple[int, ...]]  # the view of a tensor's coefficients that broadcasts over it
    excluded: Optional[Tensor]  # per unit, whether its tensor is left alone (``None``: none is)
    sharded: bool  # whether a tensor with rows is a DTensor (its rows' sums are local to each rank)


class _AgcRule(_Rule):
    per_unit = True

    def __init__(self, clip_factor: float, eps: float, exclude: Optional[Sequence[str]]) -> None:
        self.clip_factor = clip_factor
        self.eps = eps
        self.patterns = None if exclude is None else [re.compile(p) for p in exclude]
        self._layout: tuple[tuple, Optional[_AgcLayout]] = ((), None)

    def _layout_of(self, step: StepGradients) -> _AgcLayout:
        """Without patterns, the tensors of the module of the last name, the output layer when the names come in
        registration order, are left alone."""
        key = (tuple(step.names), tuple(g.shape for g in step.local_grads), step.device)
        if key != self._layout[0]:
            names, patterns = step.names, self.patterns
            if patterns is None:  # names without a module (``param_<i>``, a bare layer): nothing to tell apart
                last = names[-1].rpartition(".")[0] if names else ""
                patterns = [re.compile(rf"^{re.escape(last)}\.[^.]+$")] if last else []
            counts = [g.shape[0] if g.ndim > 1 else 1 for g in step.local_grads]
            left = [any(p.search(name) for p in patterns) for name in names]
            for name, param, alone in zip(names, step.params, left):
                if not alone:
                    _check_row_sharding(name, param)
            excluded = to_device(torch.tensor([a for a, n in zip(left, counts) for _ in range(n)]), step.device)
            sharded = any(hasattr(p, "placements") and p.ndim > 1 for p in step.params)
            shapes = [(-1, *([1] * (g.ndim - 1))) for g in step.local_grads]
            self._layout = (key, _AgcLayout(counts, shapes, excluded if any(left) else None, sharded))
        return self._layout[1]  # type: ignore[return-value]

    def clip_(self, step: StepGradients) -> tuple[Tensor, Tensor]:
        layout = self._layout_of(step)
        units = step.units if step.units is not None else unit_norms(step.grads).units
        with torch.no_grad():  # only the weights' units: no per-tensor norms
            weights = units_of(step.params, step.device)[0]
        keep = step.finite if layout.excluded is None else step.finite & ~layout.excluded
        coef = torch.where(keep, agc_coefficients(weights, units, self.clip_factor, self.eps), 1.0)
        limits = weights.clamp(min=self.eps) * self.clip_factor
        scale_(step.local_grads, [c.view(shape) for c, shape in zip(coef.split(layout.counts), layout.shapes)])
        # exact norms from the units, each scaled as a whole: no second pass over the gradients; the units left
        # alone count at their own norm in the threshold too, so the clipped norm never exceeds it
        clipped = coef * units
        limits = limits if layout.excluded is None else torch.where(layout.excluded, units, limits)
        if not layout.sharded:
            return torch.linalg.vector_norm(clipped), torch.linalg.vector_norm(limits)
        # rows are local to a shard under FSDP2: each tensor's sums are reduced over its shards
        local = torch.stack(torch._foreach_norm([*clipped.split(layout.counts), *limits.split(layout.counts)], 2.0))
        rows_only = [p if p.ndim > 1 else None for p in step.params]
        full = full_tensor_norms(rows_only + rows_only, local).view(2, -1)
        return torch.linalg.vector_norm(full, dim=1).unbind()  # type: ignore[return-value]


def _check_row_sharding(name: str, param: Tensor) -> None:
    """AGC's row norms are local only when a sharded weight is split along dim 0 (FSDP2's default)."""
    placements = getattr(param, "placements", ())
    if param.ndim > 1 and any(p.is_shard() and p.dim != 0 for p in placements):
        raise ValueError(
            f"Expected parameter {name!r} to be replicated or sharded on dim 0 for method='agc' but got placements"
            f" {tuple(placements)}"
        )


class _AdaGCRule(_Rule):
    per_unit = True

    def __init__(self, beta: float, factor: float, eps: float, warmup: _SafeStart) -> None:
        self.beta = beta
        self.factor = factor
        self.eps = eps
        self.warmup = warmup
        self.gamma: dict[str, Tensor] = {}  # per tensor name; inf until a nonzero norm is seen

    def states(self) -> dict[str, Any]:
        return {"warmup": self.warmup}

    def state_dict(self) -> dict[str, Any]:
        names = list(self.gamma)
        gamma = torch.stack([self.gamma[n] for n in names]) if names else torch.zeros(0)
        return {**super().state_dict(), "names": names, "gamma": gamma.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "gamma" in state_dict:
            gamma = state_dict["gamma"].to(torch.float32)
            self.gamma = dict(zip(state_dict.get("names", []), gamma.clone().unbind()))

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.gamma = {n: to_device(g, device) for n, g in self.gamma.items()}

    def clip_(self, step: StepGradients) -> tuple[Tensor, Tensor]:
        inf = torch.full((), math.inf, device=step.device)
        gamma = torch.stack([self.gamma.get(n, inf) for n in step.names])
        warm, warm_threshold = self.warmup.active(), self.warmup.threshold()
        # during the safe start: plain global clipping (AdaGC clips at an absolute lambda_abs there)
        global_coef = clip_coefficient(step.total, warm_threshold, self.eps)
        coef = torch.where(warm, global_coef, adagc_coefficients(step.per_tensor, gamma, self.factor))
        coef = torch.where(step.finite, coef, 1.0)
        scale_(step.local_grads, list(coef.unbind()))
        clipped = step.per_tensor * coef  # exact: each tensor was scaled as a whole
        # an unset (inf) gamma starts from the norm; the EMA's arithmetic as written (a lerp rounds differently)
        updated = torch.where(torch.isinf(gamma), clipped, self.beta * gamma + (1 - self.beta) * clipped)
        updated = torch.where(warm, torch.minimum(gamma, clipped), updated)
        # a zero gradient says nothing about a tensor's scale: its gamma stays as it was
        gamma_new = torch.where(step.finite & (step.per_tensor > 0), updated, gamma)
        self.gamma.update(zip(step.names, gamma_new.unbind()))
        limits = self.factor * gamma
        threshold = torch.linalg.vector_norm(torch.where(torch.isinf(limits), 0.0, limits))
        self.warmup.record(step.total, step.finite, warm_threshold)
        return torch.linalg.vector_norm(clipped), torch.where(warm, warm_threshold, threshold)


def _number(value: Any, name: str, *, low: float = 0.0, high: float = math.inf, closed: str = "()") -> float:
    """``value`` as a float inside the interval, or a ``ValueError``/``TypeError`` naming ``name``."""
    interval = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number in {interval} but got {type(value).__name__} {value!r}")
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if math.isnan(value) or not (above and below):
        raise ValueError(f"Expected `{name}` to be a number in {interval} but got {value!r}")
    return float(value)


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum} but got {value!r}")
    return value


def _patterns(value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
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


def _check_applies(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method's arguments with their defaults filled in; an argument given for another method is an error."""
    for name, value in given.items():
        if value is not None and name not in _ARGUMENTS[method]:
            users = [m for m, args in _ARGUMENTS.items() if name in args]
            raise ValueError(
                f"`{name}` applies to method={'/'.join(users)} only but got {name}={value!r} with method={method!r}"
            )
    return {name: default if given.get(name) is None else given[name] for name, default in _ARGUMENTS[method].items()}


class GradientClipper:
    r"""Clip gradients in place with one of seven rules, keeping the rule's statistics on the device.

    For plain PyTorch loops: call :meth:`clip_` between ``loss.backward()`` and ``optimizer.step()``. It never reads
    a device value back to the host. Arguments that belong to another method than the chosen one are errors.

    Args:
        method: ``"auto"`` (default), ``"norm"``, ``"value"``, ``"quantile"``, ``"zscore"``, ``"agc"`` or
            ``"adagc"`` (module docstring).
        max_norm: absolute cap on the global L2 norm on top of any rule (``None``: none). The threshold of ``"norm"``.
        clip_value: ``"value"``: the bound on each element's magnitude (required).
        spike_factor: ``"auto"``: a norm may be at most this multiple of the EMA of past clipped norms; default 4.
        explosion_ratio: ``"auto"``: a plain SGD step of a weight with two or more dimensions larger than this
            multiple of its norm turns the explosion cap on; default 2.
        explosion_cap: ``"auto"``: the cap on the global norm from then on; default 1.0.
        quantile: ``"quantile"``: which quantile of the history is the threshold, in ``(0, 1]``; default 0.9.
        history_length: ``"quantile"``: how many past norms the history keeps; default 1000.
        alpha: ``"zscore"``, ``"auto"``: EMA weight of the past, in ``(0, 1)``; default 0.97 and 0.95.
        z_thresh: ``"zscore"``: z-score above which a norm is clipped; default 2.5.
        zscore_mode: ``"zscore"``: ``"adaptive_scaling"`` (clip harder the larger the outlier, default) or ``"mean"``.
        agc_factor: ``"agc"``: the ratio of gradient to weight norm allowed per unit; default 0.01.
        agc_eps: ``"agc"``: floor on the weight norm, so zero-initialised weights still learn; default 1e-3.
        agc_exclude: ``"agc"``: regular expressions (``re.search``) of parameter names left unclipped. Default: the
            parameters of the module of the last name passed to :meth:`clip_`, the output layer when names come in
            registration order (nothing without names; the callback passes the output layer of the LightningModule
            explicitly).
        adagc_beta: ``"adagc"``: EMA weight of the past for the per-tensor norm, in ``[0, 1)``; default 0.98.
        adagc_factor: ``"adagc"``: the relative threshold (a tensor's norm may grow by this factor); default 1.05.
        warmup_steps: ``"quantile"``, ``"zscore"``, ``"adagc"``: length of the safe start in finite steps; default
            25, 25 (as ZClip) and 100 (as AdaGC). ``zscore`` starts its EMA from these steps' clipped norms.
        warmup_factor: the safe start's threshold is at most this multiple of the median of the norms it let through
            (default 3; ``inf``: no such limit).
        warmup_threshold: the safe start's first threshold, and its upper bound (default 1.0, ZClip's cap; ``inf``:
            none). Both ``inf`` give the references' unclipped warm-up.
        eps: added to the norm in ``threshold / (norm + eps)``, as in ``clip_grad_norm_``.

    The threshold reported for ``"value"`` is ``clip_value``; for ``"agc"`` and ``"adagc"`` it is the global norm of
    the per-unit limits (the tensors AGC leaves alone counted at their own norm); ``max_norm`` caps it in every case.

    Raises:
        ValueError / TypeError: for an unknown method, an argument out of range or of another method, or a missing
            ``max_norm`` (``"norm"``) or ``clip_value`` (``"value"``).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = GradientClipper("zscore")
        >>> for _ in range(3):
        ...     model(torch.randn(8, 4)).pow(2).sum().backward()
        ...     result = clipper.clip_(model.parameters())
        ...     model.zero_grad()
        >>> bool(result.clipped_norm <= result.threshold)
        True
    """

    def __init__(
        self,
        method: Method = "auto",
        *,
        max_norm: Optional[float] = None,
        clip_value: Optional[float] = None,
        spike_factor: Optional[float] = None,
        explosion_ratio: Optional[float] = None,
        explosion_cap: Optional[float] = None,
        quantile: Optional[float] = None,
        history_length: Optional[int] = None,
        alpha: Optional[float] = None,
        z_thresh: Optional[float] = None,
        zscore_mode: Optional[ZScoreMode] = None,
        agc_factor: Optional[float] = None,
        agc_eps: Optional[float] = None,
        agc_exclude: Optional[Sequence[str]] = None,
        adagc_beta: Optional[float] = None,
        adagc_factor: Optional[float] = None,
        warmup_steps: Optional[int] = None,
        warmup_factor: Optional[float] = None,
        warmup_threshold: Optional[float] = None,
        eps: float = 1e-6,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"Expected `method` to be one of {METHODS} but got {method!r}")
        given = dict(locals())
        for key in ("self", "method", "max_norm", "eps"):
            given.pop(key)
        args = _check_applies(method, given)
        self.method = method
        self.max_norm = None if max_norm is None else _number(max_norm, "max_norm")
        self.eps = _number(eps, "eps", closed="[)")
        if method == "norm" and self.max_norm is None:
            raise ValueError("Expected `max_norm` to be a positive number for method='norm' but got None")
        self.arguments = {k: v for k, v in args.items() if k != "agc_exclude"}  # what a checkpoint is checked against
        if method in ("quantile", "zscore", "adagc"):
            warmup = _SafeStart(
                _count(args["warmup_steps"], "warmup_steps", 0 if method == "quantile" else 1),
                _number(args["warmup_factor"], "warmup_factor", low=1.0, closed="[]"),
                _number(args["warmup_threshold"], "warmup_threshold", closed="(]"),
            )
        self._rule: _Rule
        if method == "auto":
            self._rule = _AutoRule(
                _number(args["spike_factor"], "spike_factor", low=1.0, closed="[)"),
                _number(args["alpha"], "alpha", closed="[)", high=1.0),
                _number(args["explosion_ratio"], "explosion_ratio"),
                _number(args["explosion_cap"], "explosion_cap"),
            )
        elif method == "norm":
            self._rule = _NormRule(self.max_norm)  # type: ignore[arg-type]
        elif method == "value":
            if args["clip_value"] is None:
                raise ValueError("Expected `clip_value` to be a positive number for method='value' but got None")
            self._rule = _ValueRule(_number(args["clip_value"], "clip_value"))
        elif method == "quantile":
            quantile = _number(args["quantile"], "quantile", closed="(]", high=1.0)
            self._rule = _QuantileRule(quantile, _count(args["history_length"], "history_length", 1), warmup)
        elif method == "zscore":
            if args["zscore_mode"] not in _ZSCORE_MODES:
                raise ValueError(f"Expected `zscore_mode` to be one of {_ZSCORE_MODES} but got {args['zscore_mode']!r}")
            alpha, z_thresh = _number(args["alpha"], "alpha", high=1.0), _number(args["z_thresh"], "z_thresh")
            self._rule = _ZScoreRule(alpha, z_thresh, args["zscore_mode"], self.eps, warmup)
        elif method == "agc":
            factor, agc_eps = _number(args["agc_factor"], "agc_factor"), _number(args["agc_eps"], "agc_eps")
            self._rule = _AgcRule(factor, agc_eps, _patterns(args["agc_exclude"]))
        else:
            beta = _number(args["adagc_beta"], "adagc_beta", closed="[)", high=1.0)
            self._rule = _AdaGCRule(beta, _number(args["adagc_factor"], "adagc_factor"), self.eps, warmup)
        self._device: Optional[torch.device] = None

    def clip_(
        self,
        parameters: Iterable[Tensor],
        names: Optional[Sequence[str]] = None,
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> ClipResult:
        """Clip the gradients of ``parameters`` in place and update the rule's statistics.

        Args:
            parameters: parameters; those without a gradient are skipped.
            names: one name per parameter (``"agc"``'s exclusion, ``"adagc"``'s per-tensor state); default
                ``param_<i>``.
            optimizer: the optimizer about to step (``"auto"`` reads its learning rates; required there).
        """
        step = StepGradients(parameters, names, with_units=self.method == "agc", optimizer=optimizer)
        return self.clip_step_(step)

    def clip_step_(self, step: StepGradients) -> ClipResult:
        """:meth:`clip_` for gradients whose norms were computed already (the callbacks' pipeline)."""
        if not step.grads:
            total = step.total
            return ClipResult(total, total, torch.full_like(total, math.inf), torch.ones_like(total))
        if self._device != step.device:
            self._rule.to(step.device)
            self._device = step.device
        capped = self.max_norm is not None and self.method != "norm"
        cap = torch.full((), self.max_norm, device=step.device) if capped else None
        if not self._rule.per_unit:
            threshold = self._rule.threshold(step)
            if cap is not None:
                threshold = torch.minimum(threshold, cap)
            coef = clip_coefficient(step.total, threshold, self.eps, finite=step.finite)
            scale_(step.local_grads, coef)
            return ClipResult(step.total, step.total * coef, threshold, coef)
        clipped, threshold = self._rule.clip_(step)
        if cap is not None:
            cap_coef = clip_coefficient(clipped, cap, self.eps)
            scale_(step.local_grads, cap_coef)
            clipped, threshold = clipped * cap_coef, torch.minimum(threshold, cap)
        # a zero gradient (0/0) has coefficient 1, as has a non-finite step
        coef = torch.where(step.finite, torch.nan_to_num(clipped / step.total, nan=1.0), 1.0)
        return ClipResult(step.total, torch.where(step.finite, clipped, step.total), threshold, coef)

    def state_dict(self) -> dict[str, Any]:
        """The rule's statistics (tensors) and the arguments they were made with."""
        return {"method": self.method, "arguments": dict(self.arguments), "rule": self._rule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`. Statistics made with another window size (``history_length``, ``warmup_steps``)
        are resized to the current one, keeping the most recent values, with a warning naming the argument."""
        method = state_dict.get("method", self.method)
        if method != self.method:
            raise ValueError(f"Expected a state dict of method {self.method!r} but got one of {method!r}")
        for name, saved in state_dict.get("arguments", {}).items():
            if name in ("history_length", "warmup_steps") and saved != self.arguments.get(name):
                warnings.warn(
                    f"GradientClipper: `{name}` was {saved} in the checkpoint and is {self.arguments.get(name)} now;"
                    " its statistics keep their most recent values",
                    stacklevel=2,
                )
        self._rule.load_state_dict(state_dict.get("rule", {}))
        self._device = None  # moved to the gradients' device at the next step
