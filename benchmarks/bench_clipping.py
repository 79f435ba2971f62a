"""Per-step cost of GradientClipping's methods and of their peer implementations, on the same gradients.

``cases(params)`` returns one callable per implementation; each does one optimizer step's worth of clipping work on
the ``.grad`` of ``params`` (the harness restores the gradients between calls). The gradguard cases run the real
pipeline step: the norm computation it does once per step (as ``clip_grad_norm_`` includes its own), the clipping,
and the logging into the deferred buffer (flushed every 50 calls).

Peers: ``zclip.ZClip`` (zscore), ``autoclip`` ``QuantileClip(global_threshold=True)`` (quantile), timm's
``adaptive_clip_grad`` loop (agc), the clipping part of the public AdaGC port (adagc, a per-tensor Python loop), and
``torch.nn.utils.clip_grad_value_`` (value). ``zclip`` and ``autoclip`` are test-only dependencies: their cases are
left out when they are not installed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from benchmarks._pipeline import pipeline_case
from lightning_gradguard.callbacks.clipping import GradientClipping

METHOD_CONFIGS = {
    "norm": {"method": "norm", "max_norm": 1.0},
    "value": {"method": "value", "clip_value": 0.01},
    "quantile": {"method": "quantile"},
    "zscore": {"method": "zscore"},
    "agc": {"method": "agc"},
    "adagc": {"method": "adagc"},
}


def _gradguard(params: list[nn.Parameter], config: dict, flush_every: int = 50) -> Callable[[], None]:
    """One step of GradientClipping's real work in the gradguard pipeline (``benchmarks/_pipeline.py``), in the
    steady state, as in all but the first steps of a run: past the safe start (AdaGC's, 100 steps, is the longest)."""
    return pipeline_case(GradientClipping(**config), params, flush_every=flush_every, warm_calls=100 + 2 * flush_every)


def timm_agc_loop(params: list[nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """timm's ``adaptive_clip_grad`` (pytorch-image-models): a Python loop, a few ops per parameter."""
    for p in params:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.ndim))
        w_norm = p.detach().norm(dim=dims, keepdim=True) if p.ndim > 1 else p.detach().norm()
        g_norm = p.grad.norm(dim=dims, keepdim=True) if p.ndim > 1 else p.grad.norm()
        max_norm = w_norm.clamp_(min=eps).mul_(clip_factor)
        clipped = p.grad * (max_norm / g_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(g_norm < max_norm, p.grad, clipped))


class AdaGCLoop:
    """The clipping half of the public AdaGC port (per tensor: ``min(lambda_rel * gamma / |g|, 1)``, a Python
    ``min`` on a tensor, so one host read per parameter), after its warm-up."""

    def __init__(self, params: list[nn.Parameter], beta: float = 0.98, factor: float = 1.05) -> None:
        self.params, self.beta, self.factor = params, beta, factor
        self.gamma = [p.grad.norm().reshape(1) for p in params]

    def step(self) -> None:
        for p, gamma in zip(self.params, self.gamma):
            h = min(self.factor * gamma / p.grad.norm(), 1.0)
            p.grad.mul_(h)
            gamma.mul_(self.beta).add_(p.grad.norm(), alpha=1.0 - self.beta)


def value_with_norms(params: list[nn.Parameter], clip_value: float = 0.01) -> None:
    """``clip_grad_value_`` doing what gradguard's ``"value"`` does: the gradient norm before clipping (logged as
    ``grad_norm``) and after (``grad_norm_clipped``), each as ``clip_grad_norm_`` computes it."""
    grads = [p.grad for p in params]
    torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch.nn.utils.clip_grad_value_(params, clip_value)
    torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def cases(params: list[nn.Parameter]) -> dict[str, Callable[[], None]]:
    out: dict[str, Callable[[], None]] = {f"gradguard_{m}": _gradguard(params, c) for m, c in METHOD_CONFIGS.items()}
    out["torch_clip_grad_value_"] = lambda: torch.nn.utils.clip_grad_value_(params, 0.01)
    out["clip_grad_value_ + norms before/after"] = lambda: value_with_norms(params)
    out["timm_agc"] = lambda: timm_agc_loop(params)
    out["adagc_port_loop"] = AdaGCLoop(params).step
    try:
        from zclip import ZClip

        holder = nn.Module()
        holder.params = nn.ParameterList(params)  # the same Parameter objects, so zclip sees the same gradients
        zclip = ZClip()  # its defaults: z-score mode, absolute cap 1.0
        out["zclip"] = lambda: zclip.step(holder)
    except ImportError:  # pragma: no cover - test-only dependency
        pass
    try:
        from autoclip.torch import QuantileClip

        out["autoclip"] = QuantileClip(params, quantile=0.9, history_length=1000, global_threshold=True).step
    except ImportError:  # pragma: no cover - test-only dependency
        pass
    return out
