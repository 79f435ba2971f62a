"""In-memory snapshots of the training state for :class:`~lightning_gradguard.ExplosionGuard`'s ``"rewind"``.

A :class:`TrainingSnapshot` copies, in place into buffers it keeps between snapshots:

- every parameter and buffer of the LightningModule (under FSDP2 the local shard of each ``DTensor``: every rank
  snapshots and restores its own shard, nothing is gathered),
- the state of every optimizer (moments, step counts, again local shards) and its param-group hyperparameters
  (learning rate included),
- the ``state_dict`` of every LR scheduler.

The AMP grad scaler is not rewound: its scale keeps adapting to the run. The copies go to the CPU
(``device="cpu"``: host memory, pinned when the source is on a GPU so that the copies are asynchronous) or stay
on the source device (``device="same"``: no transfer, device memory). Buffers are allocated at the first snapshot
and reused, so taking a snapshot allocates nothing afterwards; :attr:`nbytes` is what they hold.
"""

from __future__ import annotations

import copy
import time
from itertools import chain
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_gradguard.functional.norms import as_local_tensor

__all__ = ["SnapshotDevice", "TrainingSnapshot"]

SnapshotDevice = Literal["cpu", "same"]


class TrainingSnapshot:
    """Model, optimizer and LR-scheduler state of one moment of training, restorable in place.

    Attributes:
        step: the optimizer step the snapshot was taken at (``-1``: none yet).
        lr_scale: the guard's cumulative learning-rate scale at that step.
        seconds: host time of the last capture (from a GPU the copies are asynchronous: this is the time to
            enqueue them; ``benchmarks/bench_guard.py`` measures capture and restore on the CPU).
        nbytes: bytes held by the copies.
    """

    def __init__(self, device: SnapshotDevice = "cpu") -> None:
        self.device = device
        self.step = -1
        self.lr_scale = 1.0
        self.seconds = 0.0
        self._model: dict[str, Tensor] = {}
        self._optimizers: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
        self._schedulers: list[dict[str, Any]] = []

    @property
    def taken(self) -> bool:
        return self.step >= 0

    @property
    def nbytes(self) -> int:
        tensors = chain(
            self._model.values(),
            (v for states, _ in self._optimizers for s in states for v in s.values() if isinstance(v, Tensor)),
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def _copy(self, source: Tensor, buffer: Optional[Tensor]) -> Tensor:
        """``source`` (its local shard) copied into ``buffer``, or into a new buffer if it does not fit."""
        local = as_local_tensor(source.detach())
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            device = torch.device("cpu") if self.device == "cpu" else local.device
            buffer = torch.empty_like(local, device=device, pin_memory=device.type == "cpu" and local.is_cuda)
        # a device-to-pinned-host copy is asynchronous; the optimizer's later in-place update is ordered after it
        return buffer.copy_(local, non_blocking=True)

    def capture(self, module: torch.nn.Module, optimizers: list, schedulers: list, step: int, lr_scale: float) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            self._model = {
                name: self._copy(t, self._model.get(name))
                for name, t in chain(module.named_parameters(), module.named_buffers())
            }
            previous = self._optimizers if len(self._optimizers) == len(optimizers) else [([], [])] * len(optimizers)
            self._optimizers = [self._capture_optimizer(opt, old) for opt, (old, _) in zip(optimizers, previous)]
        self._schedulers = [copy.deepcopy(s.state_dict()) for s in schedulers]
        self.step = step
        self.lr_scale = lr_scale
        self.seconds = time.perf_counter() - start

    def _capture_optimizer(self, optimizer: torch.optim.Optimizer, old: list[dict[str, Any]]) -> tuple[list, list]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        states = []
        for i, p in enumerate(params):
            previous = old[i] if i < len(old) else {}
            state = {}
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    state[key] = self._copy(value, previous.get(key))
                else:
                    state[key] = copy.deepcopy(value)
            states.append(state)
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return states, groups

    def restore(self, module: torch.nn.Module, optimizers: list, schedulers: list, lr_factor: float) -> None:
        """Write the snapshot back into the live tensors, then multiply every learning rate by ``lr_factor``."""
        with torch.no_grad():
            for name, t in chain(module.named_parameters(), module.named_buffers()):
                as_local_tensor(t.detach()).copy_(self._model[name], non_blocking=True)
            for optimizer, (states, groups) in zip(optimizers, self._optimizers):
                self._restore_optimizer(optimizer, states, groups)
        for scheduler, state in zip(schedulers, self._schedulers):
            scheduler.load_state_dict(copy.deepcopy(state))
        if lr_factor != 1.0:
            scale_learning_rates(optimizers, schedulers, lr_factor)

    @staticmethod
    def _restore_optimizer(optimizer: torch.optim.Optimizer, states: list, groups: list) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p, saved in zip(params, states):
            if not saved:  # no state yet at snapshot time (e.g. Adam before its first step): start it afresh
                optimizer.state.pop(p, None)
                continue
            live = optimizer.state[p]
            for key, value in saved.items():
                # a state that existed at snapshot time still exists: optimizers never drop it
                if isinstance(value, Tensor):
                    as_local_tensor(live[key]).copy_(value, non_blocking=True)
                else:
                    live[key] = copy.deepcopy(value)
        for group, saved_group in zip(optimizer.param_groups, groups):
            group.update(copy.deepcopy(saved_group))


def scale_learning_rates(optimizers: list, schedulers: list, factor: float) -> None:
    """Multiply the learning rate of every param group, and the base rates schedulers derive it from, by ``factor``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key not in group:
                    continue
                if isinstance(group[key], Tensor):
                    group[key].mul_(factor)
                else:
                    group[key] = group[key] * factor
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
