"""Per-step cost of GradientQuantization's work, for ``benchmarks/overhead.py`` (against ``clip_grad_norm_``).

Each case quantizes the ``.grad`` of every parameter in place, as the callback does once per optimizer step (the
step number advances each call, so every call draws fresh random numbers). The peer is torch's own communication
hook math, ``quantization_pertensor_hook``-style per-tensor 8-bit rounding, written as the loop over parameters it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard.functional.quantization import GradientQuantizer  # noqa: E402

CASES = {
    "quant stochastic 8-bit": dict(method="stochastic", bits=8),
    "quant stochastic 4-bit": dict(method="stochastic", bits=4),
    "quant stochastic 8-bit + EF": dict(method="stochastic", bits=8, error_feedback=True),
    "quant stochastic 8-bit + clamp_sigma": dict(method="stochastic", bits=8, clamp_sigma=6.0),
    "quant stochastic 8-bit + clamp_quantile": dict(method="stochastic", bits=8, clamp_quantile=0.999),
    "quant nearest 8-bit": dict(method="stochastic", bits=8, rounding="nearest"),
    "quant qsgd": dict(method="qsgd"),
    "quant terngrad": dict(method="terngrad"),
    "quant sign + EF": dict(method="sign"),
}


def _per_tensor_loop(params: list[torch.nn.Parameter]) -> None:
    """The usual hand-written alternative: a Python loop, one max and one stochastic rounding per tensor."""
    for p in params:
        g = p.grad
        scale = g.abs().max().clamp(min=1e-30) / 127
        g.copy_(torch.floor(g / scale + torch.rand_like(g)) * scale)


def cases(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], None]]:
    names = [f"p{i}" for i in range(len(params))]
    out: dict[str, Callable[[], None]] = {}
    for label, config in CASES.items():
        quantizer = GradientQuantizer(**config)
        counter = [0]

        def run(quantizer: GradientQuantizer = quantizer, counter: list[int] = counter) -> None:
            quantizer.quantize_([p.grad for p in params], counter[0], names=names)
            counter[0] += 1

        out[label] = run
    out["peer: per-tensor 8-bit loop (torch.rand)"] = lambda: _per_tensor_loop(params)
    return out
