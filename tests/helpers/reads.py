"""Counting the reads of gradients and weights by norm kernels, to show that a step computes its norms once."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NormReadCounter(TorchDispatchMode):
    """Counts how many times norm kernels read each gradient and each weight (by storage); on the CPU small tensors
    reach their norm kernel through one stacked copy, which is then their read."""

    def __init__(self, grads: list[torch.Tensor], weights: list[torch.Tensor]):
        super().__init__()
        self.kind = {g.data_ptr(): "grad" for g in grads}
        self.kind.update({w.data_ptr(): "weight" for w in weights})
        self.reads = {"grad": 0, "weight": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._foreach_norm.Scalar, torch.ops.aten.stack.default):
            inputs = list(args[0])
        elif func in (
            torch.ops.aten.linalg_vector_norm.default,
            torch.ops.aten.linalg_vector_norm.out,  # row norms written straight into the unit buffer
            torch.ops.aten.norm.ScalarOpt_dim,
        ):
            inputs = [args[0]]
        else:
            inputs = []
        for t in inputs:
            kind = self.kind.get(t.data_ptr())
            if kind is not None:
                self.reads[kind] += 1
        return func(*args, **(kwargs or {}))
