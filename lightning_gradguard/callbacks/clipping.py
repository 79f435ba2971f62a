"""GradientClipping: fixed or adaptive gradient clipping at every optimizer step, sync-free and checkpointed."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_gradguard.callbacks.base import TAG_PREFIX, GradGuardCallback, GradStep
from lightning_gradguard.callbacks.monitor import GradientNormMonitor
from lightning_gradguard.events import ExplosionEvent
from lightning_gradguard.functional.clipping import GradientClipper, Method, ZScoreMode, output_layer
from lightning_gradguard.logging.buffer import FlushResult

__all__ = ["GradientClipping"]

# clipping that scales most steps down is a learning-rate cut nobody asked for: warn when, over the last
# PERSISTENT_WINDOW steps, at least PERSISTENT_SHARE of them had a coefficient below PERSISTENT_COEF
PERSISTENT_WINDOW, PERSISTENT_SHARE, PERSISTENT_COEF = 100, 0.9, 0.5
_HEAD_NAMES = {"head", "lm_head", "classifier", "fc", "out", "output", "decoder", "proj", "linear", "logits", "cls"}


class GradientClipping(GradGuardCallback):
    r"""Clip the gradients of every optimizer step, with no threshold to choose by default.

    The rules are those of :class:`~lightning_gradguard.functional.clipping.GradientClipper` (usable without
    Lightning), whose arguments this callback takes under the same names (``None``: the method's default; an
    argument of another method is an error). The default, ``"auto"``, lets a norm be at most ``spike_factor`` (4)
    times the EMA of the norms the optimizer got, and caps it at ``explosion_cap`` (1.0) from the first
    ``torch.optim.SGD`` step that would move some weight matrix by more than ``explosion_ratio`` (2) times its norm;
    it was chosen on a suite of healthy and exploding workloads and checked on others (the docs' outcome results). With
    ``"agc"`` the output layer (the last module of the LightningModule that holds parameters, named in a message) is
    left alone unless ``agc_exclude`` is given.

    Clipping runs in ``on_before_optimizer_step`` (after gradient accumulation and AMP unscaling), on the norms the
    pipeline computed once for the step, without a host read. A step whose norm is NaN or Inf is left untouched for
    the guard or AMP's scaler and does not enter the statistics. Under DDP every rank clips the same averaged
    gradients with the same statistics; under FSDP2 the norms are full-tensor norms. The statistics are checkpointed:
    a resumed run clips as the uninterrupted one would have. When at least 90% of the last 100 steps were scaled by
    less than 0.5, a warning says once that the clipping acts as a learning-rate cut, and a ``persistent_clipping``
    event is recorded.

    Logged tags, every optimizer step (``gradguard/opt<i>/...`` with several optimizers; rank 0 only):

    - ``gradguard/grad_norm_clipped``: global L2 norm after clipping.
    - ``gradguard/clip_threshold``: the threshold in force (``inf`` while there is none; ``clip_value`` for
      ``"value"``; for ``"agc"`` and ``"adagc"`` the global norm of the per-unit limits).
    - ``gradguard/clip_coef``: ``grad_norm_clipped / grad_norm`` (1: untouched).
    - ``gradguard/grad_norm``: the norm before clipping, unless a :class:`GradientNormMonitor` logs it.

    The TensorBoard custom-scalars layout gets a "gradient norm" chart (norm, clipped norm and threshold together)
    and a "clip coefficient" chart.

    Args:
        method: the rule (see above).
        flush_interval: optimizer steps between writes to the loggers; default: ``log_every_n_steps``.
        callback_metrics: also put the flushed values into ``trainer.callback_metrics``.

    Raises:
        ValueError / TypeError: in ``__init__`` for an invalid argument or one of another method; at ``setup`` when
            the Trainer also sets ``gradient_clip_val`` (the gradients would be clipped twice).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[GradientClipping()], logger=False, enable_progress_bar=False)
        >>> fixed = GradientClipping("norm", max_norm=1.0)  # Trainer(gradient_clip_val=1.0), plus logging
    """

    stage = 20

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
        flush_interval: Optional[int] = None,
        callback_metrics: bool = False,
    ) -> None:
        super().__init__(flush_interval=flush_interval, callback_metrics=callback_metrics)
        arguments = dict(locals())
        for key in ("self", "flush_interval", "callback_metrics", "__class__"):
            arguments.pop(key, None)
        GradientClipper(**arguments)  # checks every argument now rather than at the first step
        self._config = arguments
        self.method = method
        self.needs_unit_norms = method == "agc"  # the pipeline then computes row norms with the step's norms
        self._clippers: dict[int, GradientClipper] = {}  # one per optimizer, made at its first step
        self._loaded: dict[int, dict[str, Any]] = {}  # checkpointed state of clippers not made yet
        self._logs_norm = True
        self._recent: dict[int, deque] = {}
        self._pending: list[ExplosionEvent] = []
        self._warned = False

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
        self._logs_norm = not any(isinstance(cb, GradientNormMonitor) for cb in self.pipeline.callbacks)
        if self.method == "agc" and self._config["agc_exclude"] is None:
            self._exclude_output_layer(pl_module)
        self._recent, self._pending, self._warned = {}, [], False

    def _exclude_output_layer(self, pl_module: pl.LightningModule) -> None:
        layer = output_layer(pl_module)
        patterns = [] if layer is None else [rf"^{re.escape(layer)}\.[^.]+$"]
        self._config = {**self._config, "agc_exclude": patterns}
        message = (
            f"GradientClipping('agc') leaves the output layer `{layer}` unclipped (the last module that holds"
            " parameters); pass `agc_exclude` to choose the layers yourself."
        )
        if layer is not None and layer.rpartition(".")[2] not in _HEAD_NAMES:
            rank_zero_warn(message)
        else:
            rank_zero_info(message)

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
        result = self.clipper(step.optimizer_idx).clip_step_(step)
        step.clip_coef, step.clip_threshold, step.clipped_norm = result.coef, result.threshold, result.clipped_norm
        names = ["grad_norm_clipped", "clip_threshold", "clip_coef"]
        values = [result.clipped_norm, result.threshold, result.coef]
        if self._logs_norm:
            names.append("grad_norm")
            values.append(result.total_norm)
        step.log_vector(names, torch.stack(values))
        if trainer.is_global_zero:  # the coefficient reaches the host at the flush even without a logger
            idx, epoch = step.optimizer_idx, trainer.current_epoch

            def sink(step_number: int, host: list) -> None:
                self._watch(idx, epoch, step_number, host[0])

            step.pipeline.buffer.add_custom(step.step, result.coef.reshape(1), sink)

    def _watch(self, optimizer_idx: int, epoch: int, step: int, coef: float) -> None:
        recent = self._recent.setdefault(optimizer_idx, deque(maxlen=PERSISTENT_WINDOW))
        recent.append(coef < PERSISTENT_COEF)
        if self._warned or len(recent) < PERSISTENT_WINDOW or sum(recent) < PERSISTENT_SHARE * PERSISTENT_WINDOW:
            return
        self._warned = True
        rank_zero_warn(
            f"GradientClipping('{self.method}') scaled the gradients by less than {PERSISTENT_COEF} on {sum(recent)} of"
            f" the last {PERSISTENT_WINDOW} steps (up to step {step}): it acts as a learning-rate cut. If the run is"
            " healthy, loosen the clipping (another method, or a larger threshold); if it is not, lower the"
            " learning rate."
        )
        nan = float("nan")
        self._pending.append(
            ExplosionEvent(step, epoch, "persistent_clipping", nan, nan, nan, nan, "logged", optimizer=optimizer_idx)
        )

    @override
    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> list[ExplosionEvent]:
        events, self._pending = self._pending, []
        return events

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
