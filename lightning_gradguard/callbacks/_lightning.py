"""What the callbacks need from Lightning, in one place.

Everything works the same with ``import lightning.pytorch`` and with the standalone ``import pytorch_lightning``:
classes are looked up in both packages (the second only when it is imported already). The reads of private state
that have no public equivalent are here too, each pinned by a test (``tests/test_internals.py``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "classes", "ddp_comm_hook", "found_inf", "grad_scaler", "logging_step", "loss_scale", "takes_found_inf",
    "torch_optimizer",
]


def classes(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``lightning.pytorch.<module>``, and of ``pytorch_lightning.<module>`` when that
    package is in use, for ``isinstance`` checks that hold under either import."""
    found = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        if package == "pytorch_lightning" and package not in sys.modules:
            continue
        namespace = importlib.import_module(f"{package}.{module}")
        found += [getattr(namespace, name) for name in names if hasattr(namespace, name)]
    return tuple(found)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind a ``LightningOptimizer`` (its public ``optimizer`` property)."""
    return optimizer.optimizer if isinstance(optimizer, classes("core.optimizer", "LightningOptimizer")) else optimizer


def logging_step(trainer: Any) -> int:
    """The step Lightning logs ``self.log`` values and ``LearningRateMonitor`` at: batches that stepped the
    optimizers (one per batch however many optimizers step in it; ``global_step`` counts every optimizer step)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def ddp_comm_hook(strategy: Any) -> Optional[Any]:
    """The communication hook given to ``DDPStrategy(ddp_comm_hook=...)`` (kept whatever the device, registered by
    Lightning on CUDA only), or ``None``."""
    return getattr(strategy, "_ddp_comm_hook", None)


def grad_scaler(trainer: Any) -> Optional[torch.amp.GradScaler]:
    """The AMP grad scaler of ``precision="16-mixed"``, or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def loss_scale(scaler: torch.amp.GradScaler) -> Optional[Tensor]:
    """The scaler's current scale as a device tensor (``get_scale()`` would read it to the host), ``None`` before its
    first use."""
    return scaler._scale


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """Device bool: did the scaler find Inf/NaN when it unscaled this optimizer's gradients (Lightning unscales
    before ``on_before_optimizer_step``)? The scaler skips ``optimizer.step()`` itself when it did."""
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    flags = list(state.get("found_inf_per_device", {}).values())
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([f.to(device).reshape(()) for f in flags]).sum() > 0


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` device flag, as GradScaler sets it: the fused
    implementations of ``Adam``, ``AdamW`` and ``SGD`` skip the update and undo their step count on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))
