"""Clipping outcome suite: does a clipping method leave healthy runs alone and rescue exploding ones?

Every workload of ``benchmarks/workloads.py`` is trained with every method below, from the same initial weights and
batches for a given seed, with the real ``lightning.Trainer.fit`` on the CPU (no logger, no checkpoints, no
progress bar), and judged on its held-out set: the final loss, and whether the run diverged (non-finite weights or
loss, a loss above the workload's divergence threshold, or an exception).

Methods:

- ``none``: no clipping.
- ``clip_val=<c>``: Lightning's ``Trainer(gradient_clip_val=c)`` for c in 0.01, 0.03, 0.1, 0.3, 1, 3, 10.
- ``gradguard <m>``: ``GradientClipping(m)`` at its defaults, for m in zscore, quantile, agc, adagc.
- ``gradguard default``: ``GradientClipping()``, the package's default (only when asked for: ``--add``).
- ``zclip``: ``zclip.ZClipLightningCallback()`` at its defaults.
- ``autoclip``: ``autoclip.torch.QuantileClip`` at its defaults, stepped in ``on_before_optimizer_step``.
- ``candidate <name>``: the rules of ``benchmarks/candidates.py``.

Judging, per set of workloads (selection, confirmation and holdout are reported separately), on the mean held-out
loss over seeds, where a diverged seed counts as a run that learned nothing (its loss is the workload's divergence
threshold):

- healthy regret: the relative excess over ``none``; the goal on every healthy workload is no diverged seed and an
  excess of at most 2% or 0.01 absolute;
- exploding regret: the relative excess over the best ``clip_val`` of the sweep (the lowest mean among the values
  with no diverged seed); the goal on every exploding workload is no diverged seed and an excess of at most 10%;
- worst-case regret: the larger of the two. Methods meeting both goals everywhere come first, then the rest by
  their worst-case regret, smallest first.

Each run uses one CPU thread, in a pool of ``--jobs`` worker processes.

    python benchmarks/outcomes.py --jobs 2 --markdown docs/results/outcomes.md --json benchmarks/results/outcomes.json
    python benchmarks/outcomes.py --quick --jobs 2       # a smoke run: few steps, one seed, a few methods
    python benchmarks/outcomes.py --set selection --methods none "candidate zscore_relative" --jobs 2
    python benchmarks/outcomes.py --set selection --candidates all --jobs 2   # every candidate tried
    python benchmarks/outcomes.py --jobs 2 --add "gradguard default" --reuse benchmarks/results/outcomes.json \\
        --json benchmarks/results/outcomes.json --markdown docs/results/outcomes.md   # adds GradientClipping()
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.candidates import CANDIDATES, RECOMMENDED, SHORTLIST  # noqa: E402
from benchmarks.workloads import CONFIRMATION, HOLDOUT, SELECTION, SUITE  # noqa: E402

CLIP_VALS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
GRADGUARD_METHODS = ("zscore", "quantile", "agc", "adagc")
PACKAGE_DEFAULT = "gradguard default"
HEALTHY_TOLERANCE = 0.02
HEALTHY_ABSOLUTE = 0.01
EXPLODING_TOLERANCE = 0.10
QUICK_STEPS = 10
QUICK_METHODS = ("none", "clip_val=1", "gradguard agc", "zclip", "autoclip", f"candidate {RECOMMENDED}")
SETS = {"selection": SELECTION, "confirmation": CONFIRMATION, "holdout": HOLDOUT, "all": tuple(SUITE)}


def clip_val_name(value: float) -> str:
    return f"clip_val={value:g}"


def method_names() -> list[str]:
    """Every method the suite can run, in table order (``gradguard default`` last)."""
    return [
        "none",
        *(clip_val_name(c) for c in CLIP_VALS),
        *(f"gradguard {m}" for m in GRADGUARD_METHODS),
        "zclip",
        "autoclip",
        *(f"candidate {name}" for name in CANDIDATES),
        PACKAGE_DEFAULT,
    ]


def default_methods(candidates: str = "shortlist") -> list[str]:
    """Every method but ``gradguard default``, with the shortlisted candidates or (``"all"``) every one."""
    chosen = CANDIDATES if candidates == "all" else SHORTLIST
    return [
        m
        for m in method_names()
        if m != PACKAGE_DEFAULT and (not m.startswith("candidate ") or m.split(" ", 1)[1] in chosen)
    ]


def _autoclip_callback() -> Any:
    """AutoClip's own ``QuantileClip`` (defaults) applied where Lightning lets a callback touch the gradients."""
    from autoclip.torch import QuantileClip
    from lightning.pytorch.callbacks import Callback

    class AutoClipCallback(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.clipper = QuantileClip(pl_module.parameters())

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.clipper.step()

    return AutoClipCallback()


def trainer_setup(method: str) -> tuple[Optional[float], list[Any]]:
    """``(gradient_clip_val, callbacks)`` of one method."""
    if method == "none":
        return None, []
    if method.startswith("clip_val="):
        return float(method.split("=", 1)[1]), []
    if method.startswith("gradguard "):
        from lightning_gradguard import GradientClipping

        rule = method.split(" ", 1)[1]
        return None, [GradientClipping() if method == PACKAGE_DEFAULT else GradientClipping(rule)]
    if method == "zclip":
        from zclip import ZClipLightningCallback

        return None, [ZClipLightningCallback()]
    if method == "autoclip":
        return None, [_autoclip_callback()]
    if method.startswith("candidate ") and method.split(" ", 1)[1] in CANDIDATES:
        return None, [CANDIDATES[method.split(" ", 1)[1]]()]
    raise ValueError(f"Expected `method` to be one of {method_names()} but got {method!r}")


def run_case(workload: str, method: str, seed: int, steps: int) -> dict[str, Any]:
    """Train one (workload, method, seed) and judge it; runs in a worker process."""
    import lightning as L
    import torch

    from benchmarks.workloads import build
    from examples.workloads import evaluate

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    module, datamodule = build(workload, seed)
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
    except Exception as err:  # a run that stops (a peer crashing on a NaN) is a failed run
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    seconds = time.perf_counter() - start
    result = evaluate(module, datamodule)
    return {
        "workload": workload,
        "method": method,
        "seed": seed,
        "steps": trainer.global_step,
        "final_loss": result["final_loss"],
        "divergence_threshold": float(module.divergence_threshold),
        "diverged": bool(result["diverged"] or error is not None),
        "error": error,
        "seconds": round(seconds, 2),
        "clipped_steps": next((cb.clipped_steps() for cb in callbacks if hasattr(cb, "clipped_steps")), None),
    }


# ---------------------------------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------------------------------


def _scored_loss(run: dict[str, Any]) -> float:
    """The held-out loss a run is judged by: a diverged run counts as one that learned nothing (its loss is the
    workload's divergence threshold), so that regrets stay comparable."""
    return run["divergence_threshold"] if run["diverged"] else run["final_loss"]


def _mean_loss(rows: list[dict[str, Any]]) -> float:
    return statistics.fmean(_scored_loss(r) for r in rows) if rows else math.nan


def judge(results: list[dict[str, Any]], workloads: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    """Per method and workload: mean scored loss, diverged seeds, regret against the reference, regret over the
    goal's tolerance (``ratio``) and whether the goal is met; the reference of every workload."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by_key.setdefault((r["workload"], r["method"]), []).append(r)
    references: dict[str, dict[str, Any]] = {}
    for w in workloads:
        if SUITE[w].kind == "healthy":
            references[w] = {"label": "none", "loss": _mean_loss(by_key.get((w, "none"), []))}
            continue
        sweep = [(clip_val_name(c), by_key.get((w, clip_val_name(c)), [])) for c in CLIP_VALS]
        # the best fixed value: the lowest mean among the values with no diverged seed (any value if none is clean)
        ranked = sorted((any(r["diverged"] for r in rows), _mean_loss(rows), label) for label, rows in sweep if rows)
        references[w] = {"label": ranked[0][2], "loss": ranked[0][1]} if ranked else {"label": "-", "loss": math.nan}
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for m in methods:
        cells[m] = {}
        for w in workloads:
            rows = by_key.get((w, m), [])
            if not rows:
                continue
            mean, ref = _mean_loss(rows), references[w]["loss"]
            if SUITE[w].kind == "healthy":
                tolerance = max(HEALTHY_TOLERANCE * ref, HEALTHY_ABSOLUTE)
            else:
                tolerance = EXPLODING_TOLERANCE * ref
            diverged = sum(r["diverged"] for r in rows)
            ratio = (mean - ref) / tolerance
            cells[m][w] = {
                "mean": mean,
                "diverged": diverged,
                "regret": (mean - ref) / ref,
                "ratio": ratio,
                "met": diverged == 0 and ratio <= 1,
            }
    return {"references": references, "cells": cells}


def _worst(cells: dict[str, dict[str, Any]], names: list[str], key: str) -> tuple[float, str]:
    values = [(cells[w][key], w) for w in names if w in cells]
    return max(values) if values else (math.nan, "")


def summary_rows(verdict: dict[str, Any], workloads: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method: worst healthy and exploding regret, goals met, worst-case regret; the methods that meet
    both goals everywhere first, then the rest by their worst-case regret."""
    healthy = [w for w in workloads if SUITE[w].kind == "healthy"]
    exploding = [w for w in workloads if SUITE[w].kind == "exploding"]
    rows = []
    for m in methods:
        cells = verdict["cells"][m]
        if not cells:
            continue
        h_regret, h_where = _worst(cells, healthy, "regret")
        e_regret, e_where = _worst(cells, exploding, "regret")
        rows.append(
            {
                "method": m,
                "healthy_regret": h_regret,
                "healthy_where": h_where,
                "healthy_met": sum(cells[w]["met"] for w in healthy if w in cells),
                "healthy_n": sum(w in cells for w in healthy),
                "exploding_regret": e_regret,
                "exploding_where": e_where,
                "exploding_met": sum(cells[w]["met"] for w in exploding if w in cells),
                "exploding_n": sum(w in cells for w in exploding),
                "diverged": sum(cells[w]["diverged"] for w in [*healthy, *exploding] if w in cells),
                "worst": max((v for v in (h_regret, e_regret) if not math.isnan(v)), default=math.nan),
            }
        )

    def rank(row: dict[str, Any]) -> tuple[bool, float]:
        missed = row["healthy_met"] + row["exploding_met"] < row["healthy_n"] + row["exploding_n"]
        return missed, math.inf if math.isnan(row["worst"]) else row["worst"]

    return sorted(rows, key=rank)


# ---------------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def _num(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return "inf" if math.isinf(value) else f"{value:.4g}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| method | healthy regret (worst workload) | healthy goal met | exploding regret (worst workload) |"
        " exploding goal met | diverged seeds | worst-case regret |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        healthy = f"{_pct(r['healthy_regret'])} ({r['healthy_where']})" if r["healthy_n"] else "-"
        exploding = f"{_pct(r['exploding_regret'])} ({r['exploding_where']})" if r["exploding_n"] else "-"
        out.append(
            f"| {r['method']} | {healthy} | {r['healthy_met']}/{r['healthy_n']} | {exploding} |"
            f" {r['exploding_met']}/{r['exploding_n']} | {r['diverged']} | {_pct(r['worst'])} |"
        )
    return "\n".join(out)


def workload_table(
    results: list[dict[str, Any]], verdict: dict[str, Any], workload: str, methods: Sequence[str]
) -> str:
    spec = SUITE[workload]
    reference = verdict["references"][workload]
    out = [
        f"#### {workload} ({spec.kind}, {spec.family}, {spec.steps} steps)",
        "",
        f"{spec.description}. Reference: `{reference['label']}`, mean {_num(reference['loss'])}. Scored: a diverged"
        f" seed counts as {_num(_threshold(results, workload))}, the divergence threshold.",
        "",
        "| method | mean held-out loss (scored) | per seed | diverged | regret | s / run |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for m in methods:
        rows = sorted((r for r in results if r["workload"] == workload and r["method"] == m), key=lambda r: r["seed"])
        if not rows:
            continue
        cell = verdict["cells"][m][workload]
        seeds = ", ".join(_num(r["final_loss"]) for r in rows)
        seconds = statistics.fmean(r["seconds"] for r in rows)
        out.append(
            f"| {m} | {_num(cell['mean'])} | {seeds} | {cell['diverged']}/{len(rows)} | {_pct(cell['regret'])} |"
            f" {seconds:.1f} |"
        )
    return "\n".join(out)


def _threshold(results: list[dict[str, Any]], workload: str) -> float:
    return next((r["divergence_threshold"] for r in results if r["workload"] == workload), math.nan)


def report(results: list[dict[str, Any]], workloads: Sequence[str], methods: Sequence[str]) -> str:
    """Summary tables of the selection, confirmation and holdout sets (and of all workloads), then per-workload
    tables."""
    out = []
    named = (("Selection set", SELECTION), ("Confirmation set", CONFIRMATION), ("Holdout set", HOLDOUT))
    for set_name, members in named:
        chosen = [w for w in workloads if w in members]
        if not chosen:
            continue
        verdict = judge(results, chosen, methods)
        out += [f"### {set_name}: {', '.join(chosen)}", "", summary_table(summary_rows(verdict, chosen, methods)), ""]
    verdict = judge(results, workloads, methods)
    if not any(set(workloads) <= set(members) for _, members in named):
        out += ["### All workloads", "", summary_table(summary_rows(verdict, workloads, methods)), ""]
    out += ["### Per workload", ""]
    for w in workloads:
        out += [workload_table(results, verdict, w, methods), ""]
    return "\n".join(out)


def environment() -> str:
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), Python {platform.python_version()}, torch {torch.__version__},"
        f" lightning {lightning.__version__}"
    )


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (workload, method)")
    parser.add_argument("--set", choices=sorted(SETS), default="all", help="which workloads (default: all)")
    parser.add_argument("--workloads", nargs="+", default=None, choices=list(SUITE), help="instead of --set")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of: " + ", ".join(method_names()))
    parser.add_argument("--add", nargs="+", default=[], help="methods run on top of the default list")
    parser.add_argument(
        "--candidates", choices=("shortlist", "all"), default="shortlist", help="candidates of the default list"
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one CPU thread each")
    parser.add_argument("--json", type=Path, default=None, help="write every run's result to this file")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="a --json file of the same code: its runs are not run again"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="write the report to this file")
    parser.add_argument(
        "--section", default="outcomes", help="the report goes between <!-- SECTION:start --> and <!-- SECTION:end -->"
    )
    args = parser.parse_args(argv)
    methods = list(args.methods or (QUICK_METHODS if args.quick else default_methods(args.candidates)))
    methods += [m for m in args.add if m not in methods]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {method_names()}")
    if args.jobs < 1:
        parser.error(f"Expected `--jobs` to be a positive integer but got {args.jobs}")
    workloads = args.workloads or list(SETS[args.set])
    seeds = 1 if args.quick else args.seeds
    cases = [
        (w, m, seed, QUICK_STEPS if args.quick else SUITE[w].steps)
        for seed in range(seeds)
        for w in workloads
        for m in methods
    ]
    # results of earlier runs of the same cases, when asked for: only valid while the code they ran is unchanged
    reused = {}
    if args.reuse is not None:
        for r in json.loads(args.reuse.read_text()):
            reused[(r["workload"], r["method"], r["seed"], r["steps"])] = r
    results = [reused[case] for case in cases if case in reused]
    to_run = [case for case in cases if case not in reused]
    print(f"{len(to_run)} runs on {args.jobs} worker processes ({len(results)} reused)", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_case, *case) for case in to_run]
        for i, future in enumerate(as_completed(futures), 1):
            r = future.result()
            results.append(r)
            print(
                f"[{i}/{len(to_run)}] {r['workload']:<24} {r['method']:<30} seed {r['seed']}:"
                f" loss {r['final_loss']:.4g} {'DIVERGED' if r['diverged'] else 'ok'} ({r['seconds']:.1f} s)"
                + (f" {r['error']}" if r["error"] else ""),
                flush=True,
            )
    wall = time.perf_counter() - start
    order = {case: i for i, case in enumerate(cases)}
    results.sort(key=lambda r: order[(r["workload"], r["method"], r["seed"], r["steps"])])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(dump_results(results))
    body = report(results, workloads, methods)
    print(f"\ntotal wall time: {wall:.0f} s\n\n{body}")
    if args.markdown is not None:
        command = shlex.join(["python", "benchmarks/outcomes.py", *(argv if argv is not None else sys.argv[1:])])
        measured = (
            f"Measured {datetime.date.today().isoformat()} with `{command}`: {len(to_run)} runs in"
            f" {wall / 60:.0f} minutes of wall time on {args.jobs} worker processes (one thread each)"
            + (f", {len(cases) - len(to_run)} runs reused from `{args.reuse}`" if args.reuse else "")
            + f"; {environment()}."
        )
        write_report(args.markdown, f"{measured}\n\n{body}", args.section)
    return results


def dump_results(results: list[dict[str, Any]]) -> str:
    """One run per line: small, and a rerun's changes show as line diffs."""
    return "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in results) + "\n]\n"


def write_report(path: Path, text: str, section: str = "outcomes") -> None:
    """Write ``text`` between the markers of ``section`` in ``path``, keeping what is around them (markers missing
    from the file are added at its end; a new file gets a title)."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    old = path.read_text() if path.exists() else f"# Clipping outcomes\n\n{start}\n{end}\n"
    if start not in old or end not in old:
        old = f"{old.rstrip()}\n\n{start}\n{end}\n"
    before, rest = old.split(start, 1)
    after = rest.split(end, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{before}{start}\n{text.rstrip()}\n{end}{after}")


if __name__ == "__main__":
    main()
