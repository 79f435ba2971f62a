"""One fault injector for every test: bad losses and bad gradients at chosen optimizer steps."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.functional import as_local_tensor

Fault = Union[float, str]


class Faults(Callback):
    """Injects faults at given ``trainer.global_step`` values; list it before the gradguard callbacks.

    Args:
        loss: ``{step: "nan" | offset}``: the loss is made NaN (so are all gradients), or ``offset`` is added to it
            (a loss spike that leaves the gradients alone). Applied in ``on_before_backward``.
        loss_scale: ``{step: factor}``: the loss, and so every gradient, is multiplied by ``factor``.
        grads: ``{step: factor | "nan" | "inf"}``: the gradients (of ``layer`` only, if given) are multiplied by
            ``factor``, or their first element is set to NaN / Inf. Applied in ``on_before_optimizer_step``.
        unreduced: ``{step: "nan" | "inf"}``: the first element of the first parameter's gradient (of ``layer``, if
            given) is set to NaN / Inf as backward computes it, before DDP reduces it (a tensor hook).
        layer: a parameter name, or ``None`` for every parameter.
        ranks: the ranks that inject (``None``: every rank).
    """

    def __init__(
        self,
        loss: Optional[dict[int, Fault]] = None,
        loss_scale: Optional[dict[int, float]] = None,
        grads: Optional[dict[int, Fault]] = None,
        layer: Optional[str] = None,
        ranks: Optional[set[int]] = None,
        unreduced: Optional[dict[int, str]] = None,
    ) -> None:
        self.loss, self.loss_scale, self.grads = loss or {}, loss_scale or {}, grads or {}
        self.layer, self.ranks, self.unreduced = layer, ranks, unreduced or {}
        self._handle = None

    def _active(self, trainer, faults: dict) -> Optional[Fault]:
        if self.ranks is not None and trainer.global_rank not in self.ranks:
            return None
        return faults.get(trainer.global_step)

    def on_before_backward(self, trainer, pl_module, loss):
        fault, factor = self._active(trainer, self.loss), self._active(trainer, self.loss_scale)
        if fault == "nan":
            loss.mul_(math.nan)
        elif fault is not None:
            loss.add_(fault)
        if factor is not None:
            loss.mul_(factor)
        fault = self._active(trainer, self.unreduced)
        if fault is not None:
            param = next(p for n, p in pl_module.named_parameters() if self.layer in (None, n))
            bad = lambda g: g.flatten().index_fill(0, torch.tensor([0]), float(fault)).view_as(g)  # noqa: E731
            self._handle = param.register_hook(bad)

    def on_after_backward(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        fault = self._active(trainer, self.grads)
        if fault is None:
            return
        # local shards under FSDP2: a fault on one rank must not start a collective the others do not join
        grads = [
            as_local_tensor(p.grad)
            for n, p in pl_module.named_parameters()
            if p.grad is not None and self.layer in (None, n)
        ]
        with torch.no_grad():
            if isinstance(fault, str):
                next(g for g in grads if g.numel()).view(-1)[0] = float(fault)
            else:
                for g in grads:
                    g.mul_(fault)
