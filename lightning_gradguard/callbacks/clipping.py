"""GradientClipping: fixed or adaptive gradient clipping at every optimizer step, sync-free and checkpointed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_gradguard.callbacks._runtime import TAG_PREFIX, GradStep, callbacks_of
from lightning_gradguard.callbacks.base import STAGE_CLIP, GradGuardCallback
from lightning_gradguard.callbacks.monitor import GradientNormMonitor
from lightning_gradguard.functional.clipping import DEFAULT_AGC_EXCLUDE, GradientClipper, Method, ZScoreMode

__all__ = ["GradientClipping"]


class GradientClipping(GradGuardCallback):
    r"""Clip the gradients of every optimizer step, with no threshold to choose by default.

    ``GradientClipping()`` uses adaptive gradient clipping (AGC, Brock et al. 2021, as timm's ``adaptive_clip_grad``):
    every unit (a row of a weight, i.e. one output unit; a whole bias) may have a gradient norm of at most
    ``agc_factor`` (1%) of its weight norm (floored at ``agc_eps``, so zero-initialised weights still learn), and is
    scaled down to that otherwise; the classifier head (a parameter named ``head``, ``lm_head``, ``classifier`` or
    ``fc``) is left alone. The limit follows the model, not a guess of the gradient's scale: in the outcome
    benchmarks of the README it is the only threshold-free rule that never diverged, and it beat the best fixed
    ``gradient_clip_val`` of a sweep (0.1, 1, 10) on all three exploding workloads. It reads the weights as well as
    the gradients, so it costs about twice ``clip_grad_norm_`` per step; ``"zscore"`` costs about as much as
    ``clip_grad_norm_``.

    The rules that learn a global threshold from the run's own norm history: ``"zscore"`` (ZClip: EMA mean and
    variance of the global norm; a norm more than ``z_thresh`` standard deviations above the mean is clipped back
    towards the mean), ``"quantile"`` (AutoClip: a quantile of the recent norms) and ``"adagc"`` (AdaGC: one
    threshold per tensor, an EMA of its own norm). Instead of the references' unclipped warm-up they start safely:
    for the first ``warmup_steps`` steps the threshold is ``warmup_threshold`` (1.0, ZClip's default cap), lowered
    to ``warmup_factor`` (3) times the median of the norms it let through, so an early spike is clipped and never
    enters the statistics; a run whose norms stay above 1.0 (a too-high learning rate) stays clipped near 1.0, so
    set ``warmup_threshold`` to the scale of your norms (or ``None``) if they are legitimately larger. The fixed
    rules: ``"norm"`` (Lightning's ``gradient_clip_val``) and ``"value"``. The math is in
    :class:`lightning_gradguard.functional.clipping.GradientClipper`, usable without Lightning.

    Clipping runs in ``on_before_optimizer_step`` (after gradient accumulation and AMP unscaling) on the norms the
    gradguard pipeline computed once for the step, shared with :class:`GradientNormMonitor` and
    :class:`ExplosionGuard`. Nothing reads a device value back to the host. A step whose norm is NaN or Inf is left
    untouched (coefficient 1) for the guard or AMP's scaler, and does not enter the statistics. Under DDP every rank
    clips the same averaged gradients with the same statistics; under FSDP2 the norms are full-tensor norms, so all
    ranks take the same decision. The statistics are saved in checkpoints: a resumed run clips as the uninterrupted
    run would have.

    Logged tags, every optimizer step (``gradguard/opt<i>/...`` with several optimizers; rank 0 only):

    - ``gradguard/grad_norm_clipped``: global L2 norm after clipping (for ``"value"`` a second norm of the clamped
      gradients; for ``"agc"`` exact from the row norms and their coefficients, without another pass).
    - ``gradguard/clip_threshold``: the threshold in force (``clip_value`` for ``"value"``; for ``"agc"`` and
      ``"adagc"`` the global norm of the per-unit limits).
    - ``gradguard/clip_coef``: ``grad_norm_clipped / grad_norm`` (1: untouched).
    - ``gradguard/grad_norm``: the norm before clipping, when no :class:`GradientNormMonitor` is attached (the
      monitor logs it otherwise).

    The TensorBoard custom-scalars layout gets a "gradient norm" chart (norm, clipped norm and threshold together)
    and a "clip coefficient" chart.

    Args:
        method: ``"agc"`` (default), ``"zscore"``, ``"quantile"``, ``"adagc"``, ``"norm"`` or ``"value"``.
        max_norm: absolute cap on the global norm on top of any rule; the threshold of ``"norm"`` (required there).
        clip_value: the element bound of ``"value"`` (required there, not allowed elsewhere).
        quantile, history_length: ``"quantile"``: the quantile of the last ``history_length`` norms.
        alpha, z_thresh, zscore_mode: ``"zscore"``: EMA weight, z-score threshold, ``"adaptive_scaling"`` or
            ``"mean"``.
        agc_factor, agc_eps, agc_exclude: ``"agc"``: ratio of gradient to weight norm per unit, floor on the weight
            norm, name patterns left unclipped (default: a classifier head).
        adagc_beta, adagc_factor: ``"adagc"``: EMA weight and relative threshold per tensor.
        warmup_steps, warmup_factor, warmup_threshold: the safe start of the adaptive rules (``None`` turns each off;
            see :class:`~lightning_gradguard.functional.clipping.GradientClipper`).
        eps: added to the norm in ``threshold / (norm + eps)``.
        flush_interval: optimizer steps between writes to the loggers; default: ``log_every_n_steps``.

    Raises:
        ValueError / TypeError: in ``__init__`` for an invalid argument; at ``setup`` when the Trainer also sets
            ``gradient_clip_val`` (the gradients would be clipped twice).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[GradientClipping()], logger=False, enable_progress_bar=False)
        >>> fixed = GradientClipping("norm", max_norm=1.0)  # Trainer(gradient_clip_val=1.0), plus logging
    """

    stage = STAGE_CLIP

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
        flush_interval: Optional[int] = None,
    ) -> None:
        arguments = dict(locals())
        # every argument but flush_interval belongs to the clipping engine, under the same name
        self._config = {k: v for k, v in arguments.items() if k not in ("self", "flush_interval", "__class__")}
        super().__init__(flush_interval=flush_interval)
        GradientClipper(**self._config)  # checks every argument now rather than at the first step
        self.method = method
        self.needs_unit_norms = method == "agc"  # the pipeline then computes row norms with the step's norms
        self._clippers: dict[int, GradientClipper] = {}  # one per optimizer, created at its first step
        self._loaded: dict[int, dict[str, Any]] = {}  # checkpointed state of clippers not created yet
        self._logs_norm = True
        self._warmup_asked: set[int] = set()  # optimizers whose warm-up state is waiting in the log buffer

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method)

    @override
    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Both `Trainer(gradient_clip_val={trainer.gradient_clip_val!r})` and the GradientClipping callback"
                " clip the gradients, so they would be clipped twice. Remove `gradient_clip_val` from the Trainer"
                f" (GradientClipping(method='norm', max_norm={trainer.gradient_clip_val!r}) is the same fixed"
                " clipping), or remove the GradientClipping callback."
            )
        # the monitor logs the pre-clip norm; logging it here as well would write the tag twice per step
        self._logs_norm = not any(isinstance(cb, GradientNormMonitor) for cb in callbacks_of(trainer))
        self._warmup_asked = set()

    def clipper(self, optimizer_idx: int = 0) -> GradientClipper:
        """The clipping engine (and statistics) of the optimizer with index ``optimizer_idx``."""
        if optimizer_idx not in self._clippers:
            clipper = GradientClipper(**self._config)
            if optimizer_idx in self._loaded:
                clipper.load_state_dict(self._loaded.pop(optimizer_idx))
            self._clippers[optimizer_idx] = clipper
        return self._clippers[optimizer_idx]

    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        clipper = self.clipper(step.optimizer_idx)
        result = clipper.clip_(
            step.params,
            names=step.names,
            per_tensor_norms=step.per_tensor_norms,
            total_norm=step.total_norm,
            local_grads=step.local_grads,
            unit_grad_norms=step.unit_norms,
            grads=step.grads,
            finite=step.finite,
        )
        step.clip_coef, step.clip_threshold, step.clipped_norm = result.coef, result.threshold, result.clipped_norm
        names = ["grad_norm_clipped", "clip_threshold", "clip_coef"]
        values = [result.clipped_norm, result.threshold, result.coef]
        if self._logs_norm:
            names.append("grad_norm")
            values.append(result.total_norm)
        step.log_vector([step.tag(name) for name in names], torch.stack(values))
        self._ask_about_warmup(step, clipper)

    def _ask_about_warmup(self, step: GradStep, clipper: GradientClipper) -> None:
        """Ride the next flush's host read to learn when the safe start is over, so the clipper can stop evaluating
        it (same results, fewer device operations per step). One tiny entry per flush while the warm-up lasts."""
        if step.optimizer_idx in self._warmup_asked or step.step < clipper.warmup_steps:
            # the warm-up counts finite steps, so it cannot be over before this many: asking earlier would only get
            # "still on" back, and the next question would wait for the flush after that
            return
        active = clipper.warmup_active()
        if active is None or not step.runtime.writes_logs:  # no flush reads anything on this rank
            return
        idx = step.optimizer_idx
        self._warmup_asked.add(idx)

        def answer(_step: int, values: list) -> None:
            self._warmup_asked.discard(idx)
            if values[0] == 0.0 and self._clippers.get(idx) is clipper:
                clipper.warmup_finished()

        step.log_custom(active.reshape(1), answer)

    @override
    def charts(self) -> dict[str, list[str]]:
        return {
            "gradient norm": [
                rf"{TAG_PREFIX}/(opt\d+/)?grad_norm(_clipped)?$",
                rf"{TAG_PREFIX}/(opt\d+/)?clip_threshold$",
            ],
            "clip coefficient": [rf"{TAG_PREFIX}/(opt\d+/)?clip_coef$"],
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        clippers = {idx: clipper.state_dict() for idx, clipper in self._clippers.items()}
        return {"method": self.method, "clippers": {**self._loaded, **clippers}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = {int(idx): state for idx, state in state_dict.get("clippers", {}).items()}
        for idx in list(self._loaded):
            if idx in self._clippers:
                self._clippers[idx].load_state_dict(self._loaded.pop(idx))
