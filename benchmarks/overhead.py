"""Per-step cost of gradguard's work against ``torch.nn.utils.clip_grad_norm_`` on the same gradients.

Every case runs on the same gradients of one model (about 200 parameter tensors, a few million parameters),
interleaved round by round in one process so that machine noise hits all cases alike; the gradients are restored
(untimed) before every call. Printed: the median time per call and its ratio to ``clip_grad_norm_``.

Also measured:
- how close the norm computation comes to the memory limit: bytes read per second by the norm against a plain
  ``copy_`` of the same bytes (which reads and writes them);
- the time spent clipping per step inside ``Trainer.fit``: Lightning's own ``gradient_clip_val`` path against
  ``GradientClipping`` (fixed, z-score and the default, ``"auto"``);
- the whole-step overhead of ``GradientNormMonitor`` inside ``Trainer.fit``: the wall time spent inside its hooks
  (norms, buffering, the flushes to TensorBoard) as a share of the step time, and the median step time with /
  without it (an A/B difference that machine noise of a few percent can hide).

Cases of other callbacks come from ``benchmarks/bench_*.py`` modules exposing ``cases(params)``.

Usage::

    python benchmarks/overhead.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick    # small model, few rounds: checks that every case runs
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._pipeline import pipeline_case  # noqa: E402
from lightning_gradguard.callbacks.monitor import GradientNormMonitor  # noqa: E402
from lightning_gradguard.functional.norms import grad_norms  # noqa: E402


def make_model(blocks: int = 50, width: int = 256) -> nn.Module:
    """``blocks`` x (Linear + LayerNorm): 4 tensors per block (200 for 50 blocks), ~3.3M parameters at width 256."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*layers)


def populate_grads(model: nn.Module, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    saved = []
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device)
        saved.append(p.grad.clone())
    return saved


_SYNC_CUDA = False  # set when the gradients live on a GPU


def _device_sync() -> None:
    """Wait for queued device work before reading the clock (a no-op on the CPU). Decided once, not per call:
    ``torch.cuda.is_available()`` on a machine without a GPU took 100-240 us inside the timed region."""
    if _SYNC_CUDA:
        torch.cuda.synchronize()


def time_interleaved(
    cases: dict[str, Callable[[], None]], restore: Callable[[], None], rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each case; cases alternate within each round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + rounds):
        for name, fn in cases.items():
            restore()
            _device_sync()
            start = time.perf_counter()
            fn()
            _device_sync()  # on a GPU the work is asynchronous: time it to completion
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def monitor_case(params: list[nn.Parameter], names: list[str], flush_every: int = 50) -> Callable[[], None]:
    """One step of the monitor's real work: gather, norms once, buffer; a flush (one host read) every 50 calls."""
    return pipeline_case(GradientNormMonitor(layer_interval=flush_every), params, names, flush_every=flush_every)


def load_extra_cases(params: list[nn.Parameter]) -> dict[str, Callable[[], None]]:
    extra: dict[str, Callable[[], None]] = {}
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        extra.update(module.cases(params))
    return extra


def kernel_benchmark(blocks: int, width: int, rounds: int, device: str = "cpu") -> dict[str, float]:
    global _SYNC_CUDA
    _SYNC_CUDA = torch.device(device).type == "cuda"
    model = make_model(blocks, width).to(device)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    saved = populate_grads(model)

    def restore() -> None:
        torch._foreach_copy_([p.grad for p in params], saved)

    n_params = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model: {len(params)} parameter tensors, {n_params / 1e6:.2f}M parameters, torch {torch.__version__}, {where}"
    )
    cases: dict[str, Callable[[], None]] = {
        "clip_grad_norm_ (baseline)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "GradientNormMonitor step": monitor_case(params, names),
        "grad_norms (norm engine)": lambda: grad_norms([p.grad for p in params]),
    }
    cases.update(load_extra_cases(params))
    medians = time_interleaved(cases, restore, rounds)
    base = medians["clip_grad_norm_ (baseline)"]
    print(f"\n{'case':<44} {'median ms':>10} {'ratio':>7}")
    for name, t in medians.items():
        print(f"{name:<44} {t * 1e3:>10.3f} {t / base:>6.2f}x")

    flat = torch.cat([g.reshape(-1) for g in saved])
    dst = torch.empty_like(flat)
    copy_med = time_interleaved({"copy": lambda: dst.copy_(flat)}, lambda: None, rounds)["copy"]
    norm_bytes = flat.numel() * flat.element_size()
    norm_bw = norm_bytes / medians["grad_norms (norm engine)"]
    copy_bw = 2 * norm_bytes / copy_med  # a copy reads and writes every byte
    print(
        f"\nmemory: norm reads {norm_bw / 1e9:.2f} GB/s; a plain copy of the same bytes moves {copy_bw / 1e9:.2f} GB/s "
        f"(norm at {norm_bw / copy_bw:.0%} of copy bandwidth)"
    )
    return medians


def timed(callback_cls: type) -> type:
    """``callback_cls`` with the wall time spent inside its per-step hooks recorded per step in ``hook_times``
    (``on_before_optimizer_step``, where the pipeline runs, plus ``on_train_batch_end``, where the flushes happen):
    the direct measurement of its cost, where an A/B difference of whole steps is swamped by run-to-run noise of a
    few percent on a shared machine."""

    class Timed(callback_cls):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.hook_times: list[float] = []
            self._spent = 0.0

        def on_before_optimizer_step(self, *args: object) -> None:
            start = time.perf_counter()
            super().on_before_optimizer_step(*args)
            self._spent += time.perf_counter() - start

        def on_train_batch_end(self, *args: object) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(*args)
            self.hook_times.append(self._spent + time.perf_counter() - start)
            self._spent = 0.0

    Timed.__name__ = f"Timed{callback_cls.__name__}"
    return Timed


def fit_overhead(
    blocks: int, width: int, steps: int, repeats: int, batch_size: int = 64, accelerator: str = "cpu"
) -> float:
    """Median optimizer-step wall time of ``Trainer.fit`` with and without the monitor, runs interleaved.

    The monitor's cost is one read of the gradients per step, whatever the batch; the step's cost grows with the
    batch. So the overhead is printed per batch size: the smallest batch is the worst case."""
    import tempfile

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: object) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: object) -> None:
            self.times.append(time.perf_counter() - self.start)

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(blocks, width)

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * steps, width, generator=gen)
    y = torch.randn(batch_size * steps, width, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    per_step: dict[bool, list[float]] = {False: [], True: []}
    hook_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats + 1):  # repeat 0 warms up (allocator, threads) and is not counted
            for with_monitor in (False, True):
                torch.manual_seed(0)
                timer = StepTimer()
                monitor = timed(GradientNormMonitor)()
                callbacks: list[Callback] = [timer] + ([monitor] if with_monitor else [])
                trainer = L.Trainer(
                    max_steps=steps,
                    accelerator=accelerator,
                    logger=TensorBoardLogger(tmp),
                    callbacks=callbacks,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    enable_checkpointing=False,
                    log_every_n_steps=50,
                )
                trainer.fit(Regressor(), data)
                if repeat:
                    per_step[with_monitor].extend(timer.times[5:])
                    if with_monitor:
                        hook_times.extend(monitor.hook_times[5:])
    without, with_ = statistics.median(per_step[False]), statistics.median(per_step[True])
    in_hooks = sum(hook_times) / sum(per_step[True])
    print(
        f"\nTrainer.fit step, batch {batch_size}: {without * 1e3:.2f} ms without, {with_ * 1e3:.2f} ms with "
        f"GradientNormMonitor (median of {len(per_step[True])} steps each: {with_ / without - 1:+.1%}, "
        f"within run-to-run noise); time inside the monitor's hooks: {statistics.mean(hook_times) * 1e3:.2f} ms "
        f"per step = {in_hooks:.1%} of the step time (flushes included)"
    )
    return in_hooks


def fit_clipping_vs_lightning(blocks: int, width: int, steps: int, repeats: int, accelerator: str = "cpu") -> None:
    """Time spent clipping per step inside ``Trainer.fit``: Lightning's own ``gradient_clip_val=1.0`` path (its
    ``clip_gradients``, timed from the module) against ``GradientClipping`` (its hooks, flushes included), runs
    interleaved, same model, data and batches."""
    import tempfile

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard.callbacks.clipping import GradientClipping

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(blocks, width)
            self.spent: list[float] = []

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def clip_gradients(self, *args: object, **kwargs: object) -> None:
            start = time.perf_counter()
            super().clip_gradients(*args, **kwargs)  # type: ignore[arg-type]
            self.spent.append(time.perf_counter() - start)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64 * steps, width, generator=gen), torch.randn(64 * steps, width, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    skip = min(60, steps // 2)
    variants = {
        "Trainer(gradient_clip_val=1.0)": lambda: (1.0, None),
        'GradientClipping("norm", max_norm=1.0)': lambda: (None, timed(GradientClipping)("norm", max_norm=1.0)),
        'GradientClipping("zscore")': lambda: (None, timed(GradientClipping)("zscore")),
        'GradientClipping() ("auto")': lambda: (None, timed(GradientClipping)()),
    }
    spent: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats + 1):  # repeat 0 warms up and is not counted
            for name, make in variants.items():
                clip_val, callback = make()
                torch.manual_seed(0)
                module = Regressor()
                trainer = L.Trainer(
                    max_steps=steps,
                    accelerator=accelerator,
                    logger=TensorBoardLogger(tmp),
                    gradient_clip_val=clip_val,
                    callbacks=[callback] if callback is not None else [],
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    enable_checkpointing=False,
                    log_every_n_steps=50,
                )
                trainer.fit(module, data)
                if repeat:  # the steady state: past the 25-step safe start of the adaptive rules and a first flush
                    spent[name].extend((callback.hook_times if callback is not None else module.spent)[skip:])
    base = spent["Trainer(gradient_clip_val=1.0)"]
    print(
        f"\nclipping inside Trainer.fit (batch 64, per step over steps {skip}-{steps} of {repeats} runs each, "
        "gradguard's time includes its logging and flushes; mean, then median, which a stray pause moves less):"
    )
    for name, times in spent.items():
        mean, median = statistics.mean(times), statistics.median(times)
        print(
            f"  {name:<42} mean {mean * 1e3:7.3f} ms  {mean / statistics.mean(base):5.2f}x   "
            f"median {median * 1e3:7.3f} ms  {median / statistics.median(base):5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skip-fit", action="store_true", help="only the per-step kernels")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the gradients live")
    parser.add_argument("--blocks", type=int, default=None, help="Linear+LayerNorm blocks (default 50; --quick 10)")
    parser.add_argument("--width", type=int, default=None, help="their width (default 256; --quick 64)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks, width = (10, 64) if args.quick else (50, 256)
    blocks, width = args.blocks or blocks, args.width or width
    rounds = args.rounds or (5 if args.quick else 60)
    kernel_benchmark(blocks, width, rounds, args.device)
    if not args.skip_fit:
        for batch_size, steps in ((64, 150), (256, 60), (1024, 25)):
            fit_overhead(
                blocks,
                width,
                steps=20 if args.quick else steps,
                repeats=1 if args.quick else 3,
                batch_size=batch_size,
                accelerator=args.device,
            )
        fit_clipping_vs_lightning(
            blocks, width, steps=20 if args.quick else 150, repeats=1 if args.quick else 3, accelerator=args.device
        )


if __name__ == "__main__":
    main()
