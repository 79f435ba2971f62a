"""Kernel launches per optimizer step on an accelerator, counted without one.

On a GPU a step over many small tensors is bound by kernel launches (host time per launch, about 10 us on an H200),
not by memory. This script runs each case's real per-step code on the ``meta`` device, which takes the
accelerator's code path without data, and counts launches with
:class:`~lightning_gradguard.utilities.KernelLaunchCounter`: one per op, none for views, and for ``_foreach_*`` ops
one per 64 tensors where torch's fused path takes the lists, one per tensor where it does not.

Printed per case: launches with gradguard's batching of same-shape tensors (the default on an accelerator) and
without it (``_BATCH_NUMEL = 0``), beside ``clip_grad_norm_``'s foreach path (op for op as in
``torch/nn/utils/clip_grad.py``, which refuses ``meta`` tensors). Wall time on a GPU is not measured here.

Usage::

    python benchmarks/launches.py                          # the default model: 200 tensors
    python benchmarks/launches.py --blocks 4 --width 2048  # fewer, larger tensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._pipeline import pipeline_case  # noqa: E402
from benchmarks.bench_clipping import METHOD_CONFIGS  # noqa: E402
from benchmarks.overhead import make_model  # noqa: E402
from lightning_gradguard import GradientClipping, GradientNormMonitor  # noqa: E402
from lightning_gradguard.functional import norms  # noqa: E402
from lightning_gradguard.functional.clipping import _BoundViews  # noqa: E402
from lightning_gradguard.utilities import KernelLaunchCounter  # noqa: E402


def clip_grad_norm_foreach(grads: list[torch.Tensor], max_norm: float = 1.0) -> None:
    """``torch.nn.utils.clip_grad_norm_(foreach=True)`` for one (device, dtype) group, op for op."""
    norms_ = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(list(norms_)), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


def clear_layouts() -> None:
    """Forget the cached layouts, which were made for the batching setting they were made under."""
    norms._PLAN_CACHE.clear()
    _BoundViews._cache.clear()


def launches(fn) -> int:
    with KernelLaunchCounter() as counter:
        fn()
    return counter.total


def cases(params: list[torch.nn.Parameter]) -> dict:
    out = {"GradientNormMonitor": pipeline_case(GradientNormMonitor(layer_interval=10**9), params, flush_every=10**9)}
    for method, config in METHOD_CONFIGS.items():
        callback = GradientClipping(**config)
        step = pipeline_case(callback, params, flush_every=10**9)
        step()  # the first step makes the cached layouts
        for clipper in callback._clippers.values():
            clipper.warmup_finished()  # the steady state (no value can be read back from meta tensors)
        out[f'GradientClipping("{method}")'] = step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    model = make_model(args.blocks, args.width).to("meta")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.empty_like(p)
    print(
        f"model: {len(params)} parameter tensors, {sum(p.numel() for p in params) / 1e6:.2f}M parameters, "
        f"meta device (the accelerator code path), torch {torch.__version__}"
    )
    base = launches(lambda: clip_grad_norm_foreach([p.grad for p in params]))
    batched = {name: launches(fn) for name, fn in cases(params).items()}
    limit, norms._BATCH_NUMEL = norms._BATCH_NUMEL, 0  # nothing qualifies for a batch
    try:
        clear_layouts()
        alone = {name: launches(fn) for name, fn in cases(params).items()}
    finally:
        norms._BATCH_NUMEL = limit
        clear_layouts()
    print(f"\n{'case':<32} {'launches':>9} {'ratio':>7} {'unbatched':>10} {'ratio':>7}")
    print(f"{'clip_grad_norm_ (foreach path)':<32} {base:>9} {1:>6.2f}x")
    for name in batched:
        print(
            f"{name:<32} {batched[name]:>9} {batched[name] / base:>6.2f}x {alone[name]:>10} {alone[name] / base:>6.2f}x"
        )


if __name__ == "__main__":
    main()
