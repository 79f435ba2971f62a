"""GradientNormMonitor: the gradient norm of every optimizer step, per-layer norms and histograms, sync-free."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning.pytorch as pl
from typing_extensions import override

from lightning_gradguard.callbacks._runtime import TAG_PREFIX, GradStep
from lightning_gradguard.callbacks.base import STAGE_MONITOR, GradGuardCallback, check_positive_int
from lightning_gradguard.functional.norms import validate_norm_type
from lightning_gradguard.logging.buffer import FlushResult

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor(GradGuardCallback):
    r"""Record the gradient norm of every optimizer step, without a host sync between log points.

    The norms are computed once per step (shared with :class:`~lightning_gradguard.GradientClipping` and
    :class:`~lightning_gradguard.ExplosionGuard` when they are attached), kept on the device, and written to every
    logger of the Trainer at each flush, each value with its own step number. Only rank 0 writes. The norms are
    taken before any clipping, after gradient accumulation and AMP unscaling; under DDP they are the norms of the
    averaged gradients, under FSDP2 the full-tensor norms on every rank.

    Logged tags (``gradguard/opt<i>/...`` instead of ``gradguard/...`` when the Trainer has several optimizers):

    - ``gradguard/grad_norm``: global norm, every optimizer step.
    - ``gradguard/grad_norm_max``: the largest finite norm since the previous write, at each flush.
    - ``gradguard/layer/<param name>``: per-tensor norm, every ``layer_interval`` steps (``None``: never).
    - ``gradguard/hist/<param name>``: gradient histogram, every ``histogram_interval`` steps (TensorBoard only).

    With a ``TensorBoardLogger``, a custom-scalars layout named "gradguard" is registered on fit start.

    Args:
        norm_type: p of the p-norm (any ``p >= 1`` or ``"inf"``); 2 by default.
        layer_interval: log per-layer norms every this many optimizer steps, or ``None`` to disable.
        histogram_interval: log gradient histograms every this many optimizer steps, or ``None`` (default).
        flush_interval: optimizer steps between writes (one host read each); default: ``log_every_n_steps``.

    Raises:
        ValueError: for a non-positive interval or an invalid ``norm_type``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> monitor = GradientNormMonitor(layer_interval=10)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    stage = STAGE_MONITOR

    def __init__(
        self,
        norm_type: Union[float, int, str] = 2.0,
        layer_interval: Optional[int] = 25,
        histogram_interval: Optional[int] = None,
        flush_interval: Optional[int] = None,
    ) -> None:
        super().__init__(flush_interval=flush_interval)
        self.norm_type = validate_norm_type(norm_type)
        self.layer_interval = check_positive_int(layer_interval, "layer_interval", allow_none=True)
        self.histogram_interval = check_positive_int(histogram_interval, "histogram_interval", allow_none=True)
        self.steps_recorded = 0
        self.last_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(norm_type=self.norm_type)

    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        per_tensor, total = step.norms(self.norm_type)
        step.log("grad_norm", total)
        if self.layer_interval is not None and step.step % self.layer_interval == 0:
            step.log_vector([f"{TAG_PREFIX}/layer/{name}" for name in step.names], per_tensor)
        if self.histogram_interval is not None and step.step % self.histogram_interval == 0:
            step.log_histograms()
        self.steps_recorded += 1
        self.last_step = step.step

    @override
    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> None:
        # the largest finite norm of each series since the previous write, logged at that series' last step
        largest: dict[str, tuple[int, float]] = {}
        for step, metrics in result.metrics.items():
            for tag, value in list(metrics.items()):
                if not tag.endswith("/grad_norm") or math.isnan(value) or math.isinf(value):
                    continue
                max_tag = tag + "_max"
                prev = largest.get(max_tag)
                largest[max_tag] = (step, value if prev is None else max(prev[1], value))
        for max_tag, (_, value) in largest.items():
            last = max(s for s, m in result.metrics.items() if max_tag[: -len("_max")] in m)
            result.metrics[last][max_tag] = value

    @override
    def charts(self) -> dict[str, list[str]]:
        return {
            "gradient norm": [rf"{TAG_PREFIX}/(opt\d+/)?grad_norm(_clipped)?$", rf"{TAG_PREFIX}/(opt\d+/)?clip_threshold$"],
            "gradient norm max": [rf"{TAG_PREFIX}/(opt\d+/)?grad_norm_max$"],
            "layer norms": [rf"{TAG_PREFIX}/layer/.*"],
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps_recorded": self.steps_recorded, "last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_recorded = int(state_dict.get("steps_recorded", 0))
        self.last_step = int(state_dict.get("last_step", -1))
