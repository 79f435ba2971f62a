"""Does training still work with compressed DDP communication? Held-out loss of 2-process DDP training through
Lightning with ``GradientQuantization(compress_communication=True)`` against float32 DDP.

Workloads, each trained from the same weights on the same batches per seed, with two CPU processes (gloo):

- ``teacher``: the student MLP of ``benchmarks/quant_outcomes.py`` learns a random teacher's labels (Adam),
  judged by cross-entropy on a held-out set.
- ``transformer``: ``examples/workloads.py``'s character-level transformer language model on Python's standard
  library sources (SGD with momentum), with its gradient norm clipped to 0.1 by ``GradientClipping`` in every run, as
  that workload needs: the clipping sees the averaged, decompressed gradient.

The claim checked: 8-bit stochastic rounding with error feedback ends within ``TOLERANCE`` (relative) of float32
DDP's held-out loss on every seed; 4-bit and sign are reported.

Usage (Lightning starts the second process by running this script again)::

    python benchmarks/comm_outcomes.py            # 2 workloads x 4 cases x 3 seeds, about 8 minutes on 2 cores;
                                                  # writes its section of docs/results/communication.md
    python benchmarks/comm_outcomes.py --quick    # few steps, one seed: checks that every case runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quant_outcomes import TeacherStudent, quiet_trainer  # noqa: E402
from examples.workloads import build_workload, evaluate  # noqa: E402
from lightning_gradguard import GradientClipping, GradientQuantization  # noqa: E402

SECTION = "## Training outcome"  # this script's section of the results page, which benchmarks/comm.py keeps
TOLERANCE = 0.02  # held-out loss at most 2% above float32 DDP's
STEPS = {"teacher": 600, "transformer": 300}
CASES: dict[str, Optional[dict[str, Any]]] = {
    "fp32 DDP": None,
    "8-bit stochastic + EF": dict(method="stochastic", bits=8),
    "4-bit stochastic + EF": dict(method="stochastic", bits=4),
    "sign + EF": dict(method="sign"),
}


def train(workload: str, case: Optional[dict[str, Any]], steps: int, seed: int, root: str) -> float:
    """Held-out loss after ``steps`` optimizer steps of 2-process DDP (the same on both ranks)."""
    callbacks: list[Any] = []
    if case is not None:
        callbacks.append(GradientQuantization(**case, compress_communication=True))
    if workload == "teacher":
        model, datamodule = TeacherStudent(seed=seed), None
    else:
        model, datamodule = build_workload(workload, "test", seed=seed)
        callbacks.append(GradientClipping("norm", max_norm=0.1))
    L.seed_everything(seed, verbose=False)  # the distributed sampler's shuffling
    quiet_trainer(steps, callbacks, root, devices=2, strategy="ddp").fit(model, datamodule=datamodule)
    if datamodule is None:
        return model.held_out()[0]
    return evaluate(model, datamodule)["final_loss"]


def table(results: dict[str, dict[str, list[float]]], seeds: list[int], steps: dict[str, int]) -> list[str]:
    lines = []
    for workload, by_case in results.items():
        base = by_case["fp32 DDP"]
        lines += [
            f"`{workload}`, {steps[workload]} steps, seeds {seeds}: held-out loss (mean over seeds), relative to fp32"
            " DDP (mean, and the worst seed):",
            "",
            "| case | held-out loss | vs fp32 DDP (mean) | worst seed | within 2% on every seed |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for name, losses in by_case.items():
            relative = [loss / b - 1 for loss, b in zip(losses, base)]
            within = "yes" if max(relative) <= TOLERANCE else "no"
            lines.append(
                f"| {name} | {statistics.mean(losses):.4f} | {statistics.mean(relative):+.2%}"
                f" | {max(relative):+.2%} | {within} |"
            )
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one seed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "communication.md"))
    args = parser.parse_args()
    started = datetime.datetime.now().astimezone()
    load = os.getloadavg()[0]
    torch.set_num_threads(1)  # one thread per rank: the two ranks share 2 cores
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = {name: 10 for name in STEPS} if args.quick else STEPS
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for workload in STEPS:
            for name, case in CASES.items():
                losses = [train(workload, case, steps[workload], seed, root) for seed in seeds]
                results.setdefault(workload, {})[name] = losses
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return
    command = "python benchmarks/comm_outcomes.py" + (" --quick" if args.quick else "")
    lines = [
        SECTION,
        "",
        f"Held-out loss of 2-process DDP training through Lightning with `GradientQuantization(...,"
        f" compress_communication=True)` against float32 DDP, measured by `{command}` (workloads in its docstring).",
        "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Hardware: {os.cpu_count()}-core CPU ({platform.processor() or 'x86'}),"
        f" one process per rank with one thread each, gloo, torch {torch.__version__}, Python"
        f" {platform.python_version()} (load average {load:.1f} at the start; losses do not depend on it).",
        "",
        *table(results, seeds, steps),
    ]
    print("\n".join(lines))
    if not args.quick:
        path = Path(args.output)
        text = path.read_text() if path.exists() else ""
        before, _, _ = text.partition(SECTION)
        path.write_text(before.rstrip("\n") + "\n\n" + "\n".join(lines))
        print(f"written to {path}")


if __name__ == "__main__":
    main()
