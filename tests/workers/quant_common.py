"""A GradientQuantization that records what the tests check: host syncs per step and, for the first steps, the
local gradients before and after quantization (read outside the counted block)."""

from __future__ import annotations

from typing import Any

from lightning_gradguard.callbacks.quantization import GradientQuantization
from lightning_gradguard.utilities import HostSyncCounter


class RecordingQuantization(GradientQuantization):
    def __init__(self, record_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record_steps = record_steps
        self.syncs: list[int] = []
        self.records: list[dict[str, Any]] = []

    def process_step(self, trainer: Any, pl_module: Any, step: Any) -> None:
        before = [g.detach().clone() for g in step.local_grads]
        with HostSyncCounter() as counter:
            super().process_step(trainer, pl_module, step)
        self.syncs.append(counter.total)
        if step.step < self.record_steps:
            after = [g.detach().clone() for g in step.local_grads]
            self.records.append(
                {"step": step.step, "names": list(step.names), "grads": step.grads, "before": before, "after": after}
            )
