"""Candidate rules for the default of ``GradientClipping()``, as small standalone Lightning callbacks.

A candidate is a :class:`ClipCallback` over one or more :class:`Rule`: at ``on_before_optimizer_step`` every rule
proposes a threshold on the global L2 norm of the gradients, the smallest wins, and all gradients are scaled by
``min(1, threshold / norm)``. The rules keep their state on the gradients' device: no value is read back to the
host, no Python ``if`` looks at a tensor. A step whose norm is not finite is left untouched and kept out of every
rule's state.

:data:`CANDIDATES` maps a name to a factory; ``benchmarks/outcomes.py`` runs them as ``candidate <name>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = [
    "AGC",
    "CANDIDATES",
    "RECOMMENDED",
    "SHORTLIST",
    "ClipCallback",
    "EmaRatio",
    "ExplosionCap",
    "LayerExplosionCap",
    "Rule",
    "Step",
    "UpdateBound",
    "ZScore",
    "recommended",
]

_EPS = 1e-6


class Step:
    """What the rules may read about one optimizer step: the global gradient norm, whether it is finite, and (on
    demand, computed once) the learning rate of each parameter group and the global norm of the weights."""

    def __init__(self, optimizer: Any, groups: list[tuple[dict[str, Any], list[Tensor]]], norm: Tensor) -> None:
        self.optimizer, self.groups, self.norm = optimizer, groups, norm
        self.finite = torch.isfinite(norm)
        self._update_norm: Optional[Tensor] = None
        self._weight_norm: Optional[Tensor] = None

    def update_norm(self) -> Tensor:
        """``sqrt(sum over groups of (lr * grad norm of the group) ** 2)``: the size of a plain SGD step."""
        if self._update_norm is None:
            parts = []
            for group, params in self.groups:
                lr = torch.as_tensor(group["lr"], dtype=self.norm.dtype, device=self.norm.device)
                parts.append(lr * torch.nn.utils.get_total_norm([p.grad for p in params]))
            self._update_norm = torch.linalg.vector_norm(torch.stack(parts))
        return self._update_norm

    def weight_norm(self) -> Tensor:
        if self._weight_norm is None:
            params = [p.detach() for _, ps in self.groups for p in ps]
            self._weight_norm = torch.nn.utils.get_total_norm(params).to(self.norm.device, self.norm.dtype)
        return self._weight_norm


class Rule:
    """One clipping rule: :meth:`threshold` before the step's decision, :meth:`observe` after it."""

    def threshold(self, step: Step) -> Tensor:
        raise NotImplementedError

    def observe(self, step: Step, clipped_norm: Tensor) -> None:
        """Update the state with the norm the optimizer got (after clipping); rules without state ignore it."""


class UpdateBound(Rule):
    """Bound the plain SGD step relative to the weights: ``lr * norm <= ratio * ||W||``, so the threshold is
    ``ratio * ||W|| / lr`` (with several groups, the step is the root-sum-square of ``lr_i * norm_i``). Needs the
    learning rate in force and the weight norm; keeps no state. An Adam step is not ``lr * grad``, but its small
    learning rate makes this bound act only on enormous gradients there."""

    def __init__(self, ratio: float, weight_floor: float = 1e-3) -> None:
        self.ratio, self.weight_floor = ratio, weight_floor

    def threshold(self, step: Step) -> Tensor:
        allowed = self.ratio * torch.clamp(step.weight_norm(), min=self.weight_floor)
        # lr = 0 (a warm-up's first step) gives an infinite threshold: nothing moves, nothing to bound
        return allowed * step.norm / step.update_norm()


class EmaRatio(Rule):
    """At most ``factor`` times the EMA of the norms the optimizer got (clipped norms, so a spike never raises the
    bar, and a sustained rise can lift it by at most ``1 + (1 - alpha) * (factor - 1)`` per step). The EMA starts
    at the first finite norm, which passes unclipped."""

    def __init__(self, factor: float, alpha: float = 0.95) -> None:
        self.factor, self.alpha = factor, alpha
        self.mean: Optional[Tensor] = None
        self.count: Optional[Tensor] = None

    def threshold(self, step: Step) -> Tensor:
        if self.mean is None:
            self.mean = torch.zeros_like(step.norm)
            self.count = torch.zeros_like(step.norm)
        return torch.where(self.count > 0, self.factor * self.mean, torch.full_like(step.norm, math.inf))

    def observe(self, step: Step, clipped_norm: Tensor) -> None:
        updated = torch.where(self.count > 0, self.alpha * self.mean + (1 - self.alpha) * clipped_norm, clipped_norm)
        self.mean = torch.where(step.finite, updated, self.mean)
        self.count = self.count + step.finite.to(self.count.dtype)


class ZScore(Rule):
    """ZClip's rule (EMA mean and variance of the norms, weight ``alpha``; a norm with z-score above ``z`` is
    clipped to ``mean + z * std / (z_score / z)``; the statistics see the clipped norm) with a relative safe start:
    for the first ``warmup`` finite steps the threshold is ``warmup_factor`` times the mean of the norms so far
    (the first norm passes). During the safe start the threshold is also at most ``cap`` (absolute, as ZClip's
    optional cap) or ``cap_ratio * ||W|| / lr`` (the plain SGD step at most that share of the weights), when given;
    the statistics then start from the capped norms."""

    def __init__(
        self,
        z: float = 2.5,
        alpha: float = 0.97,
        warmup: int = 25,
        warmup_factor: float = 3.0,
        cap: Optional[float] = None,
        cap_ratio: Optional[float] = None,
    ) -> None:
        self.z, self.alpha, self.warmup, self.warmup_factor = z, alpha, warmup, warmup_factor
        self.cap = UpdateBound(cap_ratio) if cap_ratio is not None else None
        self.absolute_cap = cap
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None
        self.count: Optional[Tensor] = None

    def threshold(self, step: Step) -> Tensor:
        if self.mean is None:
            self.mean, self.var, self.count = (torch.zeros_like(step.norm) for _ in range(3))
        std = self.var.clamp(min=0).sqrt()
        zscore = (step.norm - self.mean) / (std + _EPS)
        spike = self.mean + self.z * std * self.z / zscore.clamp(min=self.z)
        warm = torch.where(self.count > 0, self.warmup_factor * self.mean, torch.full_like(step.norm, math.inf))
        if self.absolute_cap is not None:
            warm = warm.clamp(max=self.absolute_cap)
        if self.cap is not None:
            warm = torch.minimum(warm, self.cap.threshold(step))
        return torch.where(self.count < self.warmup, warm, spike)

    def observe(self, step: Step, clipped_norm: Tensor) -> None:
        in_warmup = self.count < self.warmup
        # during the safe start: the plain running mean and variance; afterwards the EMAs
        weight = torch.where(in_warmup, 1.0 / (self.count + 1), torch.full_like(self.count, 1 - self.alpha))
        delta = clipped_norm - self.mean
        mean = self.mean + weight * delta
        var = (1 - weight) * (self.var + weight * delta * delta)
        self.mean = torch.where(step.finite, mean, self.mean)
        self.var = torch.where(step.finite, var, self.var)
        self.count = self.count + step.finite.to(self.count.dtype)


class ExplosionCap(Rule):
    """Once a step would move the weights by more than ``ratio`` of their norm in one plain SGD step
    (``lr * norm > ratio * ||W||``), that step and every later one are clipped at ``cap`` (the conventional
    ``clip_grad_norm_`` threshold); until then, no limit. A run that takes such a step has a learning rate too high
    for where it is; a healthy run never takes one. With ``sgd_only``, only ``torch.optim.SGD`` is watched: there
    the step is ``lr * grad`` (times the momentum), while Adam-like optimizers normalise the gradient, so a large
    gradient is not a large step (their spikes are the relative rule's). With ``growth``, such a step counts only when
    its norm is also larger than the previous finite step's: a large step that makes the gradient larger is the
    feedback of a learning rate past stability, while weights growing from a zero or small start take large steps
    on shrinking gradients."""

    def __init__(self, ratio: float = 0.1, cap: float = 1.0, sgd_only: bool = False, growth: bool = False) -> None:
        self.bound = UpdateBound(ratio)
        self.cap, self.sgd_only, self.growth = cap, sgd_only, growth
        self.latched: Optional[Tensor] = None
        self.previous: Optional[Tensor] = None

    def _exploding(self, step: Step) -> Tensor:
        watched = not self.sgd_only or isinstance(getattr(step.optimizer, "optimizer", step.optimizer), torch.optim.SGD)
        exploding = step.finite & (step.norm > self.bound.threshold(step)) & watched
        if self.growth:
            previous = torch.full_like(step.norm, math.inf) if self.previous is None else self.previous
            exploding = exploding & (step.norm > previous)
        return exploding

    def threshold(self, step: Step) -> Tensor:
        if self.latched is None:
            self.latched = torch.zeros_like(step.finite)
        explosive = self.latched | self._exploding(step)
        return torch.where(explosive, torch.full_like(step.norm, self.cap), torch.full_like(step.norm, math.inf))

    def observe(self, step: Step, clipped_norm: Tensor) -> None:
        self.latched = self.latched | self._exploding(step)
        if self.growth:
            previous = torch.full_like(step.norm, math.inf) if self.previous is None else self.previous
            self.previous = torch.where(step.finite, step.norm, previous)


class LayerExplosionCap(Rule):
    """:class:`ExplosionCap` with the step measured per layer: the cap latches from the first step at which some
    weight with two or more dimensions would move, in one plain SGD step with its group's learning rate, by more
    than ``ratio`` times its own norm (``lr * ||g_l|| > ratio * ||W_l||``). A whole-model ratio mixes a layer that
    explodes with many that do not, and it flags weights that grow from a small start on a large gradient (a linear
    model on large targets). A weight whose norm is below ``floor`` (zero-initialised) is not watched until it
    grows. Only ``torch.optim.SGD`` is watched (see :class:`ExplosionCap`)."""

    def __init__(self, ratio: float = 2.0, cap: float = 1.0, floor: float = 1e-3) -> None:
        self.ratio, self.cap, self.floor = ratio, cap, floor
        self.latched: Optional[Tensor] = None

    def _exploding(self, step: Step) -> Tensor:
        if not isinstance(getattr(step.optimizer, "optimizer", step.optimizer), torch.optim.SGD):
            return torch.zeros_like(step.finite)
        worst = []
        for group, params in step.groups:
            weights = [p for p in params if p.ndim > 1]
            if weights:
                g = torch.stack(torch._foreach_norm([p.grad for p in weights]))
                w = torch.stack(torch._foreach_norm([p.detach() for p in weights]))
                rel = torch.where(w > self.floor, group["lr"] * g / w.clamp(min=self.floor), 0.0)
                worst.append(rel.amax())
        if not worst:
            return torch.zeros_like(step.finite)
        return step.finite & (torch.stack(worst).amax().to(step.norm.device) > self.ratio)

    def threshold(self, step: Step) -> Tensor:
        if self.latched is None:
            self.latched = torch.zeros_like(step.finite)
        self._now = self._exploding(step)
        explosive = self.latched | self._now
        return torch.where(explosive, torch.full_like(step.norm, self.cap), torch.full_like(step.norm, math.inf))

    def observe(self, step: Step, clipped_norm: Tensor) -> None:
        self.latched = self.latched | self._now


class ClipCallback(Callback):
    """Clip the global gradient norm to the smallest threshold of ``rules`` at every optimizer step.

    :meth:`clipped_steps` counts the steps whose coefficient was below 1; it is the one host read, made by the
    benchmark after ``fit``.
    """

    def __init__(self, *rules: Rule) -> None:
        self.rules = rules
        self._clipped: Optional[Tensor] = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in optimizer.param_groups]
        groups = [(g, ps) for g, ps in groups if ps]
        if not groups:
            return
        grads = [p.grad for _, ps in groups for p in ps]
        step = Step(optimizer, groups, torch.nn.utils.get_total_norm(grads))
        threshold = torch.stack([rule.threshold(step) for rule in self.rules]).amin()
        # clamp rather than `if coef < 1` keeps the host out; a non-finite norm (or threshold) leaves the step alone
        coef = torch.clamp(threshold / (step.norm + _EPS), max=1.0)
        coef = torch.where(step.finite & ~torch.isnan(coef), coef, torch.ones_like(coef))
        for g in grads:
            g.mul_(coef.to(g.dtype))
        for rule in self.rules:
            rule.observe(step, step.norm * coef)
        if self._clipped is None:
            self._clipped = torch.zeros((), dtype=torch.long, device=step.norm.device)
        self._clipped += (coef < 1).long()

    def clipped_steps(self) -> int:
        return 0 if self._clipped is None else int(self._clipped)


class AGC(Callback):
    """Adaptive gradient clipping per unit (a row of a weight, a whole bias): ``||g_u|| <= factor * max(||W_u||,
    eps)``; with ``lr_scaled``, ``factor / lr`` instead (a bound on the plain SGD step of each unit relative to its
    weights). Nothing excluded, no state."""

    def __init__(self, factor: float, lr_scaled: bool = False, eps: float = 1e-3) -> None:
        self.factor, self.lr_scaled, self.eps = factor, lr_scaled, eps
        self._clipped: Optional[Tensor] = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        any_clipped = None
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            factor = torch.as_tensor(self.factor, dtype=params[0].grad.dtype, device=params[0].grad.device)
            if self.lr_scaled:
                factor = factor / torch.as_tensor(group["lr"], dtype=factor.dtype, device=factor.device)
            for p in params:
                dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
                g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=p.ndim > 1)
                w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=p.ndim > 1).clamp(min=self.eps)
                coef = torch.clamp(factor * w_norm / (g_norm + _EPS), max=1.0)
                coef = torch.where(torch.isfinite(g_norm) & ~torch.isnan(coef), coef, torch.ones_like(coef))
                p.grad.mul_(coef)
                below = (coef < 1).any()
                any_clipped = below if any_clipped is None else any_clipped | below
        if any_clipped is not None:
            if self._clipped is None:
                self._clipped = torch.zeros((), dtype=torch.long, device=any_clipped.device)
            self._clipped += any_clipped.long()

    def clipped_steps(self) -> int:
        return 0 if self._clipped is None else int(self._clipped)


CANDIDATES: dict[str, Callable[[], Callback]] = {
    "zscore_relative": lambda: ClipCallback(ZScore()),
    "ema_ratio_3": lambda: ClipCallback(EmaRatio(3.0)),
    "update_0.03": lambda: ClipCallback(UpdateBound(0.03)),
    "update_0.1": lambda: ClipCallback(UpdateBound(0.1)),
    "update_0.03+ema_ratio_3": lambda: ClipCallback(UpdateBound(0.03), EmaRatio(3.0)),
    "update_0.1+ema_ratio_3": lambda: ClipCallback(UpdateBound(0.1), EmaRatio(3.0)),
    "update_0.03+zscore_relative": lambda: ClipCallback(UpdateBound(0.03), ZScore()),
    "agc_0.1": lambda: AGC(0.1),
    "agc_lr_0.01": lambda: AGC(0.01, lr_scaled=True),
    "zscore_relative_z3.5": lambda: ClipCallback(ZScore(z=3.5)),
    "update_0.05+ema_ratio_10": lambda: ClipCallback(UpdateBound(0.05), EmaRatio(10.0)),
    "update_0.05+zscore_relative": lambda: ClipCallback(UpdateBound(0.05), ZScore()),
    "zscore_cap_update_0.01": lambda: ClipCallback(ZScore(cap_ratio=0.01)),
    "zscore_cap_1": lambda: ClipCallback(ZScore(cap=1.0)),
    "zscore_cap_2": lambda: ClipCallback(ZScore(cap=2.0)),
    "ema_ratio_3+explosion_cap_1": lambda: ClipCallback(EmaRatio(3.0), ExplosionCap(0.1, 1.0)),
    "ema_ratio_5+explosion_cap_1": lambda: ClipCallback(EmaRatio(5.0), ExplosionCap(0.1, 1.0)),
    "zscore_relative+explosion_cap_1": lambda: ClipCallback(ZScore(), ExplosionCap(0.1, 1.0)),
    "ema_ratio_3+explosion_0.05_cap_1": lambda: ClipCallback(EmaRatio(3.0), ExplosionCap(0.05, 1.0)),
    "ema_ratio_3+sgd_explosion_cap_1": lambda: ClipCallback(EmaRatio(3.0), ExplosionCap(0.1, 1.0, sgd_only=True)),
    "ema_ratio_4+sgd_explosion_cap_1": lambda: ClipCallback(EmaRatio(4.0), ExplosionCap(0.1, 1.0, sgd_only=True)),
    "ema_ratio_5+sgd_explosion_cap_1": lambda: ClipCallback(EmaRatio(5.0), ExplosionCap(0.1, 1.0, sgd_only=True)),
    "ema_ratio_4+sgd_growth_cap_1": lambda: ClipCallback(EmaRatio(4.0), ExplosionCap(0.1, 1.0, True, growth=True)),
    "ema_ratio_4+layer_explosion_1_cap_1": lambda: ClipCallback(EmaRatio(4.0), LayerExplosionCap(1.0)),
    "ema_ratio_4+layer_explosion_2_cap_1": lambda: recommended(),
    "ema_ratio_4+layer_explosion_4_cap_1": lambda: ClipCallback(EmaRatio(4.0), LayerExplosionCap(4.0)),
}
"""``name -> factory`` of every candidate rule, in the order they were tried."""

RECOMMENDED = "ema_ratio_4+layer_explosion_2_cap_1"
"""The rule chosen on the selection set: see :func:`recommended`. It replaced ``ema_ratio_4+sgd_explosion_cap_1``,
whose whole-model trigger stalls a linear regression on large targets (``linear_sgd``): the three per-layer triggers
tied with it on the other selection workloads and met both goals on ``linear_sgd``; of the two best (ratios 1 and 2,
equal on every selection workload) the larger ratio was taken, as it leaves more room to healthy runs."""

SHORTLIST: tuple[str, ...] = (
    "zscore_relative",
    "ema_ratio_3",
    "update_0.03",
    "update_0.03+zscore_relative",
    "agc_0.1",
    "agc_lr_0.01",
    "zscore_cap_1",
    "update_0.05+ema_ratio_10",
    "ema_ratio_3+explosion_cap_1",
    "ema_ratio_3+sgd_explosion_cap_1",
    "ema_ratio_4+sgd_explosion_cap_1",
    "ema_ratio_5+sgd_explosion_cap_1",
    "ema_ratio_4+layer_explosion_1_cap_1",
    RECOMMENDED,
    "ema_ratio_4+layer_explosion_4_cap_1",
)
"""The candidates the full suite runs by default: one of each idea, and the recommended rule with its neighbours."""


def recommended() -> ClipCallback:
    """The recommended default: a spike limit relative to the run's own norms, plus a cap for SGD runs that explode.

    At every optimizer step, with ``n`` the global L2 norm of the gradients:

    - **spike limit** ``4 * mu``, where ``mu`` is the EMA (weight 0.95 on the past) of the norms the optimizer got
      (after clipping), started at the first finite norm, which passes unclipped. A spike never raises the bar; a
      sustained rise lifts it by at most 15% per step.
    - **explosion cap** ``1.0`` on this step and every later one, from the first step at which the optimizer is
      ``torch.optim.SGD`` and the plain SGD step of some weight with two or more dimensions would be more than twice
      that weight's norm: ``lr_l * ||g_l|| > 2 * ||W_l||``, with the learning rate in force and weights of norm
      below 1e-3 (zero-initialised) not watched.

    The threshold is the smaller of the two; ``coef = min(1, threshold / (n + 1e-6))`` scales every gradient. A step
    whose norm is not finite is left untouched and changes neither ``mu`` nor the latch.
    """
    return ClipCallback(EmaRatio(4.0), LayerExplosionCap(2.0))
