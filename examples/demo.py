"""The gradguard showdown: one training run that explodes, three ways to run it.

1. ``no guard``: the workload as shipped, plain ``Trainer``.
2. ``gradient_clip_val``: Lightning's built-in fixed-threshold norm clipping.
3. ``gradguard``: the gradguard defaults: ``GradientNormMonitor()``, ``GradientClipping()`` (no threshold to pick:
   spikes are cut back to the run's own scale, and a run whose SGD steps explode is capped) and
   ``ExplosionGuard()`` (skips steps with non-finite gradients or loss).

All three start from the same weights and see the same batches. The first two runs also carry a
``GradientNormMonitor`` and an ``ExplosionGuard(on_nonfinite="log")``: both only observe (the gradients are not
touched), so that all three runs have the same TensorBoard charts and event counts. Each run writes its TensorBoard
logs to ``<log-dir>/<run>``, next to each other, and the script ends with a table and the ``tensorboard`` command
that opens them.

Every run uses one CPU thread: the models are small, and more threads only add contention on a shared machine.

    python examples/demo.py                               # about 20 seconds on 2 CPU cores
    python examples/demo.py --workload rnn --steps 500
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# examples/ is not an installed package: make ``examples.workloads`` importable from a plain ``python examples/demo.py``
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from typing_extensions import override  # noqa: E402

from examples.workloads import WORKLOADS, build_workload, evaluate  # noqa: E402
from lightning_gradguard.callbacks.clipping import GradientClipping  # noqa: E402
from lightning_gradguard.callbacks.guard import ExplosionGuard, GradientExplosionError  # noqa: E402
from lightning_gradguard.callbacks.monitor import GradientNormMonitor  # noqa: E402

DEFAULT_WORKLOAD = "mlp"  # synthetic data: the same on every Python version
DEFAULT_STEPS = 300
DEFAULT_CLIP_VAL = 1.0
RUN_NAMES = ("no_guard", "gradient_clip_val", "gradguard")


@dataclass
class Outcome:
    """One row of the final table."""

    run: str
    final_loss: float
    diverged: bool
    events: int
    skipped: int
    seconds: float
    note: str = ""


class StepProgress(Callback):
    """One progress bar per run, counting optimizer steps (Lightning's own bar restarts at every epoch)."""

    def __init__(self, description: str, total: int) -> None:
        self.description = description
        self.total = total
        self.bar: Optional[Any] = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar = tqdm(total=self.total, desc=self.description, unit="step", dynamic_ncols=True, leave=True)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        assert self.bar is not None
        self.bar.update(trainer.global_step - self.bar.n)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)  # host read: the demo's own display

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def callbacks_for(run: str) -> list[Callback]:
    """The gradguard callbacks of a run: the defaults for ``gradguard``, observers only for the other two."""
    if run == "gradguard":
        return [GradientNormMonitor(), GradientClipping(), ExplosionGuard()]
    return [GradientNormMonitor(), ExplosionGuard(on_nonfinite="log", on_spike="log")]


def run_one(run: str, args: argparse.Namespace, position: int) -> Outcome:
    module, datamodule = build_workload(args.workload, size="test", seed=args.seed)
    log_dir = Path(args.log_dir) / run
    shutil.rmtree(log_dir, ignore_errors=True)  # a re-run replaces this run's curves instead of adding to them
    progress = StepProgress(f"[{position}/{len(RUN_NAMES)}] {run:<17}", args.steps)
    callbacks = callbacks_for(run)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,  # judged once at the end, on the held-out set, by ``evaluate``
        gradient_clip_val=args.clip_val if run == "gradient_clip_val" else None,
        logger=TensorBoardLogger(args.log_dir, name=run, version=""),
        callbacks=[*callbacks, progress],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    note = ""
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule)
    except GradientExplosionError as err:  # ExplosionGuard gave up (too many bad steps in a row): report, go on
        note = f"stopped at step {err.event.step}: {str(err).splitlines()[0]}"
    finally:
        progress.close()
    result = evaluate(module, datamodule)
    seconds = time.perf_counter() - start
    guard = next(cb for cb in callbacks if isinstance(cb, ExplosionGuard))
    return Outcome(
        run=run,
        final_loss=result["final_loss"],
        diverged=result["diverged"],
        events=sum(guard.event_counts.values()),
        skipped=guard.skipped,
        seconds=seconds,
        note=note,
    )


def format_table(outcomes: list[Outcome], workload: str, threshold: float) -> str:
    header = ("run", "held-out loss", "diverged", "events", "skipped steps", "wall time")
    rows = [
        (
            o.run,
            f"{o.final_loss:.4f}" if math.isfinite(o.final_loss) else str(o.final_loss),
            "yes" if o.diverged else "no",
            str(o.events),
            str(o.skipped),
            f"{o.seconds:.1f} s",
        )
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{o.run}: {o.note}" for o in outcomes if o.note]
    footer = [
        f"held-out loss: mean loss on the {workload!r} workload's fixed held-out set; diverged: that loss is not"
        f" finite or above {threshold:.4g} (what a model that learned nothing scores)",
        "events: what ExplosionGuard detected (non-finite gradients or loss, norm or loss spikes); only the gradguard"
        " run acts on them (it skips non-finite steps), in the other two it only counts",
    ]
    return "\n".join([*lines, "", *footer, *notes])


def tensorboard_command(log_dir: str) -> str:
    """The command that opens the logs, with the ``tensorboard`` of this environment when it has one."""
    script = Path(sys.executable).parent / "tensorboard"
    if script.exists():
        try:
            script = script.relative_to(Path.cwd())
        except ValueError:
            pass
        return f"{script} --logdir {log_dir}"
    return f"{sys.executable} -m tensorboard.main --logdir {log_dir}"


def quiet_lightning() -> None:
    """Keep the console to the progress bars and the table."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    # raised inside Lightning by newer torch releases; nothing the user of the demo can act on
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


def main(argv: Optional[list[str]] = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per run")
    parser.add_argument("--clip-val", type=float, default=DEFAULT_CLIP_VAL, help="the Trainer's gradient_clip_val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="gradguard_logs")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    quiet_lightning()
    torch.set_num_threads(1)
    print(f"Training the {args.workload!r} workload for {args.steps} steps, three ways (same weights, same batches):")
    outcomes = [run_one(run, args, i + 1) for i, run in enumerate(RUN_NAMES)]
    threshold = WORKLOADS[args.workload][0].divergence_threshold
    print("\n" + format_table(outcomes, args.workload, threshold))
    print(f"\nTensorBoard logs of the three runs: {Path(args.log_dir).resolve()}/{{{','.join(RUN_NAMES)}}}")
    print(f"Open the dashboard (Custom Scalars tab):\n\n    {tensorboard_command(args.log_dir)}\n")
    return outcomes


if __name__ == "__main__":
    main()
