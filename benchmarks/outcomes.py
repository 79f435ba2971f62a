"""Outcome benchmark: does each clipping method rescue the example workloads that explode?

Every workload of ``examples/workloads.py`` is trained with every method below, from the same initial weights and
batches for a given seed, and judged on its held-out set (``examples.workloads.evaluate``): final loss, and
whether the run diverged (non-finite weights or loss, or a loss above the workload's divergence threshold, which
is what a model that learned nothing scores).

Methods:

- ``none``: no clipping.
- ``clip_val=<c>``: Lightning's ``Trainer(gradient_clip_val=c)`` at three fixed thresholds.
- ``gradguard <method>``: ``GradientClipping(method)`` at its defaults, for every method that has defaults
  (``"norm"`` and ``"value"`` need a threshold: the fixed rows stand for them).
- ``gradguard defaults``: ``GradientClipping()`` + ``ExplosionGuard()``, the recommended start.
- ``zclip``: ``zclip.ZClipLightningCallback()`` at its defaults, when the ``zclip`` package is installed.
- ``autoclip``: ``autoclip.torch.QuantileClip`` at its defaults (per-parameter 0.9-quantile of each parameter's
  norm history), stepped in ``on_before_optimizer_step``, when the ``autoclip`` package is installed.

Each run uses one CPU thread and runs in a pool of ``--jobs`` worker processes; a run that stops with an exception
(e.g. ``GradientExplosionError`` from the guard) counts as diverged. Prints a markdown table per workload: the
median held-out loss over seeds, the number of diverged seeds, and the mean wall time of a run.

    python benchmarks/outcomes.py            # the full benchmark (about 8 minutes on 2 quiet cores)
    python benchmarks/outcomes.py --quick    # a smoke run: few steps, one seed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# optimizer steps per run: enough for the unguarded runs to fail and the guarded ones to learn, sized so that the
# whole benchmark (3 workloads x 11 methods x 3 seeds) takes about 8 minutes on 2 quiet cores
STEPS = {"rnn": 300, "transformer": 150, "mlp": 300}
QUICK_STEPS = 10
CLIP_VALS = (0.1, 1.0, 10.0)
GRADGUARD_METHODS = ("zscore", "quantile", "agc", "adagc")


def method_names() -> list[str]:
    names = ["none", *(f"clip_val={c:g}" for c in CLIP_VALS), *(f"gradguard {m}" for m in GRADGUARD_METHODS)]
    names.append("gradguard defaults")
    names += [peer for peer in ("zclip", "autoclip") if importlib.util.find_spec(peer) is not None]
    return names


def _autoclip_callback() -> Any:
    """AutoClip's own ``QuantileClip`` (defaults) applied where Lightning lets a callback touch the gradients."""
    from autoclip.torch import QuantileClip
    from lightning.pytorch.callbacks import Callback
    from typing_extensions import override

    class AutoClipCallback(Callback):
        @override
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.clipper = QuantileClip(pl_module.parameters())

        @override
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.clipper.step()

    return AutoClipCallback()


def trainer_setup(method: str) -> tuple[Optional[float], list[Any]]:
    """``(gradient_clip_val, callbacks)`` of one method."""
    from lightning_gradguard.callbacks.clipping import GradientClipping
    from lightning_gradguard.callbacks.guard import ExplosionGuard

    if method == "none":
        return None, []
    if method.startswith("clip_val="):
        return float(method.split("=", 1)[1]), []
    if method == "gradguard defaults":
        return None, [GradientClipping(), ExplosionGuard()]
    if method.startswith("gradguard "):
        return None, [GradientClipping(method.split(" ", 1)[1])]
    if method == "zclip":
        from zclip import ZClipLightningCallback

        return None, [ZClipLightningCallback()]
    if method == "autoclip":
        return None, [_autoclip_callback()]
    raise ValueError(f"Expected `method` to be one of {method_names()} but got {method!r}")


def run_case(workload: str, method: str, seed: int, steps: int) -> dict[str, Any]:
    """Train one (workload, method, seed) and judge it; runs in a worker process."""
    import logging

    import lightning as L
    import torch

    from examples.workloads import build_workload, evaluate

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    module, datamodule = build_workload(workload, size="test", seed=seed)
    clip_val, callbacks = trainer_setup(method)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        gradient_clip_val=clip_val,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    error = None
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule)
    except Exception as err:  # a run that stops (the guard giving up, a peer crashing) is a failed run
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    seconds = time.perf_counter() - start
    result = evaluate(module, datamodule)
    return {
        "workload": workload,
        "method": method,
        "seed": seed,
        "steps": trainer.global_step,
        "final_loss": result["final_loss"],
        "diverged": bool(result["diverged"] or error is not None),
        "error": error,
        "seconds": seconds,
    }


def summarise(results: list[dict[str, Any]], workloads: list[str], methods: list[str]) -> str:
    """One markdown table per workload: median held-out loss, diverged seeds, mean seconds per run."""
    from examples.workloads import WORKLOADS

    out = []
    for workload in workloads:
        threshold = WORKLOADS[workload][0].divergence_threshold
        out += [
            f"**{workload}** (diverged: held-out loss not finite or above {threshold:.3g})",
            "",
            "| method | median held-out loss | diverged | s / run |",
            "| --- | ---: | ---: | ---: |",
        ]
        for method in methods:
            rows = [r for r in results if r["workload"] == workload and r["method"] == method]
            if not rows:
                continue
            losses = [r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf for r in rows]
            median = statistics.median(losses)
            diverged = sum(r["diverged"] for r in rows)
            seconds = statistics.mean(r["seconds"] for r in rows)
            loss_text = f"{median:.4g}" if math.isfinite(median) else "nan/inf"
            out.append(f"| {method} | {loss_text} | {diverged}/{len(rows)} | {seconds:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    from examples.workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (workload, method)")
    parser.add_argument("--workloads", nargs="+", default=sorted(WORKLOADS), choices=sorted(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of: " + ", ".join(method_names()))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (1 thread each)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's result to this file")
    args = parser.parse_args(argv)
    methods = args.methods or method_names()
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {method_names()}")
    seeds = 1 if args.quick else args.seeds
    cases = [
        (workload, method, seed, QUICK_STEPS if args.quick else STEPS[workload])
        for seed in range(seeds)
        for workload in args.workloads
        for method in methods
    ]
    print(f"{len(cases)} runs on {args.jobs} worker processes", flush=True)
    results = []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(run_case, *zip(*cases)):
            results.append(result)
            status = "DIVERGED" if result["diverged"] else "ok"
            print(
                f"[{len(results)}/{len(cases)}] {result['workload']:<11} {result['method']:<18} seed {result['seed']}:"
                f" loss {result['final_loss']:.4g} {status} ({result['seconds']:.1f} s)"
                + (f" {result['error']}" if result["error"] else ""),
                flush=True,
            )
    steps = ", ".join(f"{w} {QUICK_STEPS if args.quick else STEPS[w]}" for w in args.workloads)
    print(f"\noptimizer steps per run: {steps}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s\n")
    print(summarise(results, args.workloads, methods))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
