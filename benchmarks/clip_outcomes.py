"""Does ``GradientClipping()`` with its defaults rescue exploding workloads without a hand-tuned threshold?

For every workload of ``examples/workloads.py`` and every seed, the same model is trained (same initial weights,
same batches) with no clipping, with Lightning's fixed ``gradient_clip_val`` at several values, and with
``GradientClipping()`` at its defaults. The table gives the held-out loss (mean over seeds, with the worst seed) and
how many seeds diverged; the verdict line compares the default with the best fixed value of the sweep.

    python benchmarks/clip_outcomes.py --jobs 2                       # every workload, 3 seeds, test size
    python benchmarks/clip_outcomes.py --workloads rnn mlp --seeds 0 1 2 3 4 --clips 0.1 1 10
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import lightning as L  # noqa: E402

from examples.workloads import WORKLOADS, build_workload, evaluate  # noqa: E402
from lightning_gradguard.callbacks.clipping import GradientClipping  # noqa: E402

DEFAULT_STEPS = {"rnn": 300, "transformer": 150, "mlp": 300}  # as benchmarks/outcomes.py
TOLERANCE = 0.02
"""The default "reaches the quality" of the best fixed value when its mean loss is within 2% of it (or better)
and it diverges on no more seeds."""


def train(workload: str, size: str, seed: int, steps: int, clip: Optional[float], default: bool) -> dict[str, Any]:
    """One run: ``clip`` is Lightning's ``gradient_clip_val``; ``default`` attaches ``GradientClipping()``."""
    module, data = build_workload(workload, size=size, seed=seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        gradient_clip_val=clip,
        callbacks=[GradientClipping()] if default else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    result = evaluate(module, data)
    result["seconds"] = time.perf_counter() - start
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and worst held-out loss over seeds (a diverged or non-finite run counts as ``inf``)."""
    losses = [math.inf if r["diverged"] or not math.isfinite(r["final_loss"]) else r["final_loss"] for r in results]
    return {
        "mean": statistics.fmean(losses) if all(math.isfinite(x) for x in losses) else math.inf,
        "worst": max(losses),
        "diverged": sum(r["diverged"] for r in results),
        "seeds": len(results),
        "losses": [r["final_loss"] for r in results],
        "seconds": sum(r["seconds"] for r in results),
    }


def fmt(summary: dict[str, Any]) -> str:
    mean = "diverged" if math.isinf(summary["mean"]) else f"{summary['mean']:.4f}"
    return f"{mean} (worst {summary['worst']:.4g}, {summary['diverged']}/{summary['seeds']} diverged)"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clips", nargs="+", type=float, default=[0.1, 1.0, 10.0])
    parser.add_argument("--size", default="test", choices=["test", "full"])
    parser.add_argument("--steps", nargs="*", default=[], help="per-workload steps, e.g. rnn=300 mlp=150")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one CPU thread each)")
    args = parser.parse_args(argv)
    steps = {**DEFAULT_STEPS, **{k: int(v) for k, v in (s.split("=") for s in args.steps)}}
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    variants: list[tuple[str, Optional[float], bool]] = [("no clipping", None, False)]
    variants += [(f"gradient_clip_val={c:g}", c, False) for c in args.clips]
    variants.append(("GradientClipping()", None, True))
    jobs = [
        (workload, args.size, seed, steps[workload], clip, default)
        for workload in args.workloads
        for _, clip, default in variants
        for seed in args.seeds
    ]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.starmap(_train_one_thread, jobs)
    else:
        results = [_train_one_thread(*job) for job in jobs]
    by_job = iter(results)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in args.workloads:
        table[workload] = {}
        for label, _, _ in variants:
            runs = [next(by_job) for _ in args.seeds]
            table[workload][label] = summarise(runs)
            summary = table[workload][label]
            print(f"{workload:12s} {label:24s} {fmt(summary)}  losses {summary['losses']}", flush=True)

    print(f"\n| variant | {' | '.join(f'{w} ({steps[w]} steps)' for w in args.workloads)} |")
    print(f"| --- | {' | '.join('---' for _ in args.workloads)} |")
    for label, _, _ in variants:
        print(f"| {label} | {' | '.join(fmt(table[w][label]) for w in args.workloads)} |")
    print()
    verdicts = []
    for workload in args.workloads:
        fixed = {label: s for label, s in table[workload].items() if label.startswith("gradient_clip_val")}
        best_label, best = min(fixed.items(), key=lambda item: (item[1]["diverged"], item[1]["mean"]))
        default = table[workload]["GradientClipping()"]
        none = table[workload]["no clipping"]
        reaches = default["diverged"] <= best["diverged"] and default["mean"] <= best["mean"] * (1 + TOLERANCE)
        verdicts.append(reaches)
        print(
            f"{workload}: no clipping {fmt(none)}; best fixed {best_label} {fmt(best)}; default {fmt(default)}"
            f" -> {'reaches' if reaches else 'does NOT reach'} the best fixed value"
        )
    reached = sum(verdicts)
    print(f"\nthe default reaches the best fixed value on {reached} of {len(verdicts)} workloads (the bar: 2)")
    return 0 if reached >= min(2, len(verdicts)) else 1


def _train_one_thread(*args: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    return train(*args)


if __name__ == "__main__":
    sys.exit(main())
