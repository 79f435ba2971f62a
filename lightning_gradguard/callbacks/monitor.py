"""GradientNormMonitor: the gradient norm of every optimizer step, per-layer norms and histograms, sync-free."""

from __future__ import annotations

import math
from typing import Optional, Union

import lightning.pytorch as pl
from typing_extensions import override

from lightning_gradguard.callbacks.base import TAG_PREFIX, GradGuardCallback, GradStep, check_positive_int
from lightning_gradguard.functional.norms import grad_norms, validate_norm_type
from lightning_gradguard.logging.buffer import FlushResult

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor(GradGuardCallback):
    r"""Record the gradient norm of every optimizer step, without a host sync between log points.

    The norms are computed once per step (shared with :class:`~lightning_gradguard.GradientClipping` and
    :class:`~lightning_gradguard.ExplosionGuard` when they are attached), kept on the device, and written to every
    logger of the Trainer at each flush, each value with its own step (Lightning's logging step, the one
    ``self.log`` uses). Only rank 0 writes. The norms are taken before any clipping, after gradient accumulation
    and AMP unscaling; under DDP they are the norms of the averaged gradients, under FSDP2 full-tensor norms.

    Logged tags (``gradguard/opt<i>/...`` instead of ``gradguard/...`` when the Trainer has several optimizers):

    - ``gradguard/grad_norm``: global norm, every optimizer step.
    - ``gradguard/grad_norm_max``: the largest finite norm since the previous write, at each flush.
    - ``gradguard/layer/<param name>``: per-tensor norm, every ``layer_interval`` steps of the optimizer.
    - ``gradguard/hist/<param name>``: gradient histogram, every ``histogram_interval`` steps (TensorBoard only).

    With a ``TensorBoardLogger``, a custom-scalars layout named "gradguard" is registered on fit start.

    Args:
        norm_type: p of the p-norm (any ``p >= 1`` or ``"inf"``); 2 by default.
        layer_interval: log per-layer norms every this many optimizer steps, or ``None`` to disable.
        histogram_interval: log gradient histograms every this many optimizer steps, or ``None`` (default).
        flush_interval: optimizer steps between writes (one host read each); default: ``log_every_n_steps``.
        callback_metrics: also put the flushed values into ``trainer.callback_metrics`` (for ``EarlyStopping``).

    Raises:
        ValueError: for a non-positive interval or an invalid ``norm_type``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> monitor = GradientNormMonitor(layer_interval=10)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    stage = 0

    def __init__(
        self,
        norm_type: Union[float, int, str] = 2.0,
        layer_interval: Optional[int] = 25,
        histogram_interval: Optional[int] = None,
        flush_interval: Optional[int] = None,
        callback_metrics: bool = False,
    ) -> None:
        super().__init__(flush_interval=flush_interval, callback_metrics=callback_metrics)
        self.norm_type = validate_norm_type(norm_type)
        self.layer_interval = check_positive_int(layer_interval, "layer_interval", allow_none=True)
        self.histogram_interval = check_positive_int(histogram_interval, "histogram_interval", allow_none=True)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(norm_type=self.norm_type)

    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        l2 = self.norm_type == 2
        per_tensor, total = (step.per_tensor, step.total) if l2 else grad_norms(step.grads, self.norm_type)
        step.log("grad_norm", total)
        if self.layer_interval is not None and step.optimizer_step % self.layer_interval == 0:
            step.log_vector([f"layer/{name}" for name in step.names], per_tensor)
        if self.histogram_interval is not None and step.optimizer_step % self.histogram_interval == 0:
            step.log_histograms()

    @override
    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> None:
        # the largest finite norm of each series since the previous write, logged at that series' last step
        largest: dict[str, tuple[int, float]] = {}
        for step, metrics in result.metrics.items():
            for tag, value in metrics.items():
                if tag.endswith("/grad_norm") and math.isfinite(value):
                    _, best = largest.get(tag, (step, value))
                    largest[tag] = (step, max(best, value))
        for tag, (last, value) in largest.items():
            result.metrics[last][tag + "_max"] = value

    @override
    def charts(self) -> dict[str, list[str]]:
        return {
            "gradient norm": [
                rf"{TAG_PREFIX}/(opt\d+/)?grad_norm(_clipped)?$", rf"{TAG_PREFIX}/(opt\d+/)?clip_threshold$"
            ],
            "gradient norm max": [rf"{TAG_PREFIX}/(opt\d+/)?grad_norm_max$"],
            "layer norms": [rf"{TAG_PREFIX}/(opt\d+/)?layer/.*"],
        }
