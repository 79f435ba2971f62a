"""In-memory snapshots of the training state for :class:`~lightning_gradguard.ExplosionGuard`'s ``"rewind"``.

A :class:`TrainingSnapshot` holds copies of every parameter and buffer of the LightningModule and of every
optimizer's state (moments, step counts), in buffers allocated at the first capture and reused after (under FSDP2
each rank copies its local shards; nothing is gathered), plus the :class:`Schedule`: the param groups'
hyperparameters (learning rate included) and the ``state_dict`` of every LR scheduler. The AMP grad scaler is not
rewound: its scale keeps adapting to the run. Copies go to the CPU (pinned when the source is on a GPU, so that
they are asynchronous) or stay on the source device (``"same"``).
"""

from __future__ import annotations

import copy
import time
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gradguard.functional.norms import as_local_tensor

__all__ = ["STEP_LR", "Schedule", "SnapshotDevice", "TrainingSnapshot"]

SnapshotDevice = Literal["cpu", "same"]
STEP_LR = "gradguard_schedule_lr"
"""param-group key holding the schedule's learning rate while an optimizer step runs at a scaled one"""


class Schedule:
    """The learning-rate schedule at one moment: param-group hyperparameters and LR-scheduler states."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], schedulers: list[Any]) -> None:
        self.groups = [[self._hyperparameters(g) for g in o.param_groups] for o in optimizers]
        self.schedulers = [copy.deepcopy(s.state_dict()) for s in schedulers]

    @staticmethod
    def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
        saved = {k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", STEP_LR)}
        if STEP_LR in group:  # taken during a step at a scaled rate: the schedule's own rate is this one
            saved["lr"] = copy.deepcopy(group[STEP_LR])
        return saved

    def restore(self, optimizers: list[torch.optim.Optimizer], schedulers: list[Any]) -> None:
        for optimizer, groups in zip(optimizers, self.groups):
            for group, saved in zip(optimizer.param_groups, groups):
                group.update(copy.deepcopy(saved))
        for scheduler, state in zip(schedulers, self.schedulers):
            scheduler.load_state_dict(copy.deepcopy(state))


class TrainingSnapshot:
    """Model, optimizer and LR-schedule state of one moment of training, restorable in place.

    Attributes:
        step: the step the snapshot was taken at (``-1``: none yet).
        seconds: host time of the last capture (from a GPU the copies are asynchronous: the time to enqueue them).
        nbytes: bytes held by the copies of the model and optimizer state.
        schedule: the :class:`Schedule` at the capture.
    """

    def __init__(self, device: SnapshotDevice = "cpu") -> None:
        self.device = device
        self.step = -1
        self.seconds = 0.0
        self.schedule: Schedule = Schedule([], [])
        self._model: dict[str, Tensor] = {}
        self._optimizers: list[list[dict[str, Any]]] = []

    @property
    def taken(self) -> bool:
        return self.step >= 0

    @property
    def nbytes(self) -> int:
        tensors = chain(self._model.values(), (v for o in self._optimizers for s in o for v in s.values()))
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

    def _copy(self, source: Tensor, buffer: Any) -> Tensor:
        """``source`` (its local shard) copied into ``buffer``, or into a new buffer if it does not fit."""
        local = as_local_tensor(source.detach())
        if not isinstance(buffer, Tensor) or buffer.shape != local.shape or buffer.dtype != local.dtype:
            device = torch.device("cpu") if self.device == "cpu" else local.device
            buffer = torch.empty_like(local, device=device, pin_memory=device.type == "cpu" and local.is_cuda)
        # a device-to-pinned-host copy is asynchronous; the optimizer's later in-place update is ordered after it
        return buffer.copy_(local, non_blocking=True)

    def capture(self, module: torch.nn.Module, optimizers: list, schedulers: list, step: int) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            named = chain(module.named_parameters(), module.named_buffers())
            self._model = {name: self._copy(t, self._model.get(name)) for name, t in named}
            if len(self._optimizers) != len(optimizers):
                self._optimizers = [[] for _ in optimizers]
            self._optimizers = [self._capture_state(o, old) for o, old in zip(optimizers, self._optimizers)]
        self.schedule = Schedule(optimizers, schedulers)
        self.step = step
        self.seconds = time.perf_counter() - start

    def _capture_state(self, optimizer: torch.optim.Optimizer, old: list[dict[str, Any]]) -> list[dict[str, Any]]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        states = []
        for i, p in enumerate(params):
            previous = old[i] if i < len(old) else {}
            states.append(
                {
                    key: self._copy(value, previous.get(key)) if isinstance(value, Tensor) else copy.deepcopy(value)
                    for key, value in optimizer.state.get(p, {}).items()
                }
            )
        return states

    def restore_state(self, module: torch.nn.Module, optimizers: list) -> None:
        """Write the model and optimizer state back into the live tensors (the schedule: :attr:`schedule`)."""
        with torch.no_grad():
            for name, t in chain(module.named_parameters(), module.named_buffers()):
                as_local_tensor(t.detach()).copy_(self._model[name], non_blocking=True)
            for optimizer, states in zip(optimizers, self._optimizers):
                params = [p for group in optimizer.param_groups for p in group["params"]]
                for p, saved in zip(params, states):
                    if not saved:  # no state yet at capture time (e.g. Adam before its first step): start afresh
                        optimizer.state.pop(p, None)
                        continue
                    live = optimizer.state[p]
                    for key, value in saved.items():  # a state that existed then still exists: optimizers keep it
                        if isinstance(value, Tensor):
                            as_local_tensor(live[key]).copy_(value, non_blocking=True)
                        else:
                            live[key] = copy.deepcopy(value)
