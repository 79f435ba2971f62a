"""ExplosionGuard: per-step cost (for ``benchmarks/overhead.py``) and the memory and time of a rewind snapshot.

``cases(params)`` gives one optimizer step of the guard's work on the ``.grad`` of ``params``: gathering the
gradients and their norms once (``GradStep``, the work every gradguard callback shares), then detection (running
median/MAD of the norm, top-k layers, event flags) into the deferred buffer, flushed every 50 steps as in
training. ``"log"`` never reads a device value back; ``"skip"`` reads one scalar per step. The peer is the usual
hand-written NaN guard: a loop over parameters with one ``isfinite(...).all()`` host read each.

Run directly, it measures a ``"rewind"`` snapshot (model + Adam state) of the same model: bytes held, capture and
restore time::

    python benchmarks/bench_guard.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard.callbacks._rewind import TrainingSnapshot  # noqa: E402
from benchmarks._pipeline import pipeline_case  # noqa: E402
from lightning_gradguard.callbacks.guard import ExplosionGuard  # noqa: E402

FLUSH_EVERY = 50


def _guard_case(params: list[torch.nn.Parameter], **guard_kwargs: object) -> Callable[[], None]:
    return pipeline_case(ExplosionGuard(**guard_kwargs), params, flush_every=FLUSH_EVERY)  # type: ignore[arg-type]


def _per_parameter_nan_check(params: list[torch.nn.Parameter]) -> bool:
    """What hand-written skip-on-NaN callbacks do: one host read per parameter."""
    return any(not bool(torch.isfinite(p.grad).all()) for p in params)


def cases(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], None]]:
    return {
        "ExplosionGuard log (norms + detection)": _guard_case(params, on_nonfinite="log", on_spike="log"),
        "ExplosionGuard skip (+1 host read)": _guard_case(params, on_nonfinite="skip", on_spike="skip"),
        "peer: per-parameter isfinite().all() loop": lambda: _per_parameter_nan_check(params),
    }


def snapshot_benchmark(blocks: int = 50, width: int = 256, repeats: int = 10) -> None:
    from benchmarks.overhead import make_model, populate_grads

    model = make_model(blocks, width)
    populate_grads(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.step()  # creates the Adam state (two moments and a step count per tensor)
    n_params = sum(p.numel() for p in model.parameters())
    snapshot = TrainingSnapshot("cpu")
    capture, restore = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        snapshot.capture(model, [optimizer], [], step=0, lr_scale=1.0)
        capture.append(time.perf_counter() - start)
        start = time.perf_counter()
        snapshot.restore(model, [optimizer], [], lr_factor=1.0)
        restore.append(time.perf_counter() - start)
    ratio = snapshot.nbytes / (n_params * 4)
    capture_ms, first_ms = statistics.median(capture) * 1e3, capture[0] * 1e3
    restore_ms = statistics.median(restore) * 1e3
    print(
        f"snapshot of {n_params / 1e6:.2f}M parameters + Adam state: {snapshot.nbytes / 2**20:.1f} MiB"
        f" ({ratio:.2f}x the parameter bytes), capture {capture_ms:.1f} ms (first, allocating: {first_ms:.1f} ms),"
        f" restore {restore_ms:.1f} ms (median of {repeats}, CPU, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    snapshot_benchmark()
