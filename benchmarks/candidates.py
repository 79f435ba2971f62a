"""Candidate rules for the default of ``GradientClipping()``, as small standalone Lightning callbacks.

Each rule scales all gradients of a step by one coefficient ``min(1, threshold / norm)``, where ``norm`` is the
global L2 norm of the gradients and ``threshold`` is the rule's, computed from state kept on the gradients' device:
no value is read back to the host, no Python ``if`` looks at a tensor. A step whose norm is not finite is left
untouched and kept out of the state.

:data:`CANDIDATES` maps a name to a factory; ``benchmarks/outcomes.py`` runs them as ``candidate <name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["CANDIDATES", "GlobalClipRule"]

_EPS = 1e-6


class GlobalClipRule(Callback):
    """Base of the candidates: the global norm, the rule's threshold, one coefficient for every gradient.

    Subclasses implement :meth:`threshold` (a 0-dim tensor; ``inf`` leaves the step alone) and :meth:`observe`
    (update the state after the step's decision). :meth:`clipped_steps` counts the steps whose coefficient was
    below 1; it is the one host read, made by the benchmark after ``fit``.
    """

    def __init__(self) -> None:
        self._clipped: Optional[Tensor] = None

    def threshold(self, norm: Tensor, finite: Tensor, optimizer: Any, params: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def observe(self, norm: Tensor, finite: Tensor, coef: Tensor) -> None:
        """Called after clipping with the raw norm, whether it was finite, and the coefficient applied."""

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        finite = torch.isfinite(norm)
        threshold = self.threshold(norm, finite, optimizer, params)
        # a non-finite norm is left to the optimizer or a guard; clamp rather than `if` keeps the host out of it
        coef = torch.where(finite, torch.clamp(threshold / (norm + _EPS), max=1.0), torch.ones_like(norm))
        for g in grads:
            g.mul_(coef.to(g.dtype))
        if self._clipped is None:
            self._clipped = torch.zeros((), dtype=torch.long, device=norm.device)
        self._clipped += (coef < 1).long()
        self.observe(norm, finite, coef)

    def clipped_steps(self) -> int:
        return 0 if self._clipped is None else int(self._clipped)


CANDIDATES: dict[str, Callable[[], Callback]] = {}
"""``name -> factory`` of every candidate rule."""
