"""Bytes on the wire and step time of the quantized all-reduce DDP hook against float32 DDP and torch's
``fp16_compress_hook``, on CPU processes talking gloo over the loopback interface.

(a) Bytes per step and rank, at world sizes 2 and 4: counted by the hook (``state.stats.bytes_sent``) or, for the
    baselines, by the ring all-reduce formula ``2 (W-1)/W * bytes``, and checked against the kernel's counter of
    bytes sent on ``lo`` (``/proc/net/dev``) minus the idle traffic of an equally long pause before each case.
(b) Step time (forward, backward with the hook, SGD step) of a model of about 25M parameters on 2 processes.
(c) Bytes per step and rank against a float32 ring all-reduce for world sizes 2 to 1024, from the formula
    (:func:`~lightning_gradguard.functional.communication.wire_bytes`) for the same model in DDP's 25 MiB buckets.

Usage::

    python benchmarks/comm.py            # a few minutes on 2 CPU cores; writes docs/results/communication.md
    python benchmarks/comm.py --quick    # small models, few steps: checks that every case runs
"""

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_gradguard.functional.communication import (  # noqa: E402
    QuantizedCommState,
    quantized_allreduce_hook,
    wire_bytes,
)

CASES = {
    "fp32 DDP": None,
    "fp16_compress_hook": "fp16",
    "hook 8-bit": dict(method="stochastic", bits=8),
    "hook 4-bit": dict(method="stochastic", bits=4),
    "hook 2-bit": dict(method="stochastic", bits=2),
    "hook sign": dict(method="sign"),
}
BUCKET_ELEMENTS = 25 * 2**20 // 4  # DDP's default bucket_cap_mb=25 of float32
NOTES = [
    "## Reading the tables",
    "",
    "- Counted: the hook's own count (`state.stats.bytes_sent`, equal to the bytes handed to the collectives in"
    " `tests/test_communication.py`); for fp32 DDP and `fp16_compress_hook`, the ring all-reduce formula. The"
    " kernel's counter adds TCP/IP headers and gloo's control messages, and the idle traffic subtracted is an"
    " estimate: the smallest volumes (sign) scatter most.",
    "- Per bucket and rank the hook sends, in each of its two hops, `W - 1` chunks of codes with one float32 scale"
    " per block of at most 2048 elements (0.2% of the 8-bit codes), plus one byte for the non-finite flag in the"
    " second hop. Chunks are padded to whole blocks of a multiple of 8 elements, which shows at large world sizes.",
    "- Step time: here the hook's quantization runs on the same CPU cores as the forward and backward passes, one"
    " thread per rank, while the loopback moves the float32 gradients fast; the extra arithmetic then costs more"
    " than the bytes saved. The hook pays where the link, not the arithmetic, bounds the step (see the break-even"
    " column).",
    "",
]


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def loopback_sent() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])  # transmit bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def wrap(model: nn.Module, case):
    ddp = DistributedDataParallel(model)
    state = None
    if case == "fp16":
        ddp.register_comm_hook(None, fp16_compress_hook)
    elif case is not None:
        state = QuantizedCommState(**case)
        ddp.register_comm_hook(state, quantized_allreduce_hook)
    return ddp, state


def train_steps(ddp, steps: int, batch: torch.Tensor) -> list[float]:
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        ddp(batch).square().mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, port: int, task: str, config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batch = torch.randn(config["batch"], 256, generator=torch.Generator().manual_seed(rank))
    results: dict = {}
    for repeat in range(config["repeats"]):
        for name, case in CASES.items():
            torch.manual_seed(0)
            ddp, state = wrap(mlp(config["width"], config["depth"]), case)
            train_steps(ddp, 2, batch)  # DDP rebuilds its buckets after the first iteration
            dist.barrier()
            if task == "bytes":
                idle = loopback_sent()  # the machine's own traffic during a pause, to subtract
                time.sleep(config["idle"])
                idle = loopback_sent() - idle
                dist.barrier()
                sent, start = loopback_sent(), time.perf_counter()
                counted = 0
                for _ in range(config["steps"]):
                    train_steps(ddp, 1, batch)
                    counted += state.stats.bytes_sent if state is not None else 0
                dist.barrier()
                elapsed, sent = time.perf_counter() - start, loopback_sent() - sent
                numel = sum(p.numel() for p in ddp.parameters())
                ring = 2 * (world - 1) / world * numel * (2 if case == "fp16" else 4)
                measured = (sent - idle * elapsed / config["idle"]) / (world * config["steps"])
                results[name] = dict(measured=measured, counted=counted / config["steps"] if state else ring)
            else:
                results.setdefault(name, []).extend(train_steps(ddp, config["steps"], batch))
            del ddp, state
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.destroy_process_group()


def run(world: int, task: str, config: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(world, port, task, config, out), nprocs=world)
        return torch.load(os.path.join(out, "results.pt"))


def bytes_table(world: int, results: dict, numel: int) -> list[str]:
    fp32 = results["fp32 DDP"]["measured"]
    lines = [
        f"World size {world}, {numel / 1e6:.1f}M parameters; bytes per step and rank:",
        "",
        "| case | measured on `lo` | counted / formula | measured / counted | fewer bytes than fp32 DDP (measured) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['measured'] / 1e6:.3f} MB | {r['counted'] / 1e6:.3f} MB"
            f" | {r['measured'] / r['counted']:.3f} | **{fp32 / r['measured']:.2f}x** |"
        )
    return lines + [""]


def step_bytes(case, numel: int, world: int) -> float:
    """Bytes per step and rank of ``case`` for ``numel`` parameters in DDP's 25 MiB buckets (formula)."""
    if case is None or case == "fp16":
        return 2 * (world - 1) / world * numel * (4 if case is None else 2)
    width = QuantizedCommState(**case).width
    buckets = [BUCKET_ELEMENTS] * (numel // BUCKET_ELEMENTS) + [numel % BUCKET_ELEMENTS] * bool(numel % BUCKET_ELEMENTS)
    return sum(wire_bytes(n, world, width) for n in buckets)


def time_table(results: dict, numel: int) -> list[str]:
    base = statistics.median(results["fp32 DDP"])
    lines = [
        f"2 processes, {numel / 1e6:.1f}M parameters; median step time over {len(results['fp32 DDP'])} steps."
        " Break-even link: the bandwidth per rank at which sending the bytes saved against fp32 DDP takes as long"
        " as the extra time of the step here; on a slower link the compressed step is the faster one.",
        "",
        "| case | step | against fp32 DDP | bytes per step and rank | break-even link |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    fp32_bytes = step_bytes(None, numel, 2)
    for name, times in results.items():
        median, sent = statistics.median(times), step_bytes(CASES[name], numel, 2)
        extra = median - base
        even = f"{(fp32_bytes - sent) * 8 / extra / 1e9:.2f} Gbit/s" if extra > 0 and sent < fp32_bytes else "-"
        lines.append(f"| {name} | {median * 1e3:.0f} ms | {median / base:.2f}x | {sent / 1e6:.1f} MB | {even} |")
    return lines + [""]


def formula_table(numel: int) -> list[str]:
    hooks = {name: case for name, case in CASES.items() if isinstance(case, dict)}
    lines = [
        f"{numel / 1e6:.1f}M parameters in buckets of 25 MiB; MB per step and rank (ratio against fp32):",
        "",
        "| world size | fp32 ring | " + " | ".join(hooks) + " |",
        "| ---: | ---: |" + " ---: |" * len(hooks),
    ]
    for world in [2**k for k in range(1, 11)]:
        fp32 = step_bytes(None, numel, world)
        sent = [step_bytes(case, numel, world) for case in hooks.values()]
        cells = [f"{b / 1e6:.2f} ({fp32 / b:.2f}x)" for b in sent]
        lines.append(f"| {world} | {fp32 / 1e6:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few steps")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "communication.md"))
    args = parser.parse_args()
    bytes_config = dict(width=512, depth=2, batch=16, steps=3, repeats=1, idle=0.5)
    time_config = dict(width=512, depth=2, batch=16, steps=2, repeats=1)
    if not args.quick:
        bytes_config.update(width=1024, depth=4, steps=5, idle=1.0)
        time_config.update(width=2880, depth=3, batch=32, steps=4, repeats=2)
    lines = [
        "# Communication",
        "",
        "Bytes on the wire and step time of the quantized all-reduce DDP hook"
        " (`lightning_gradguard.functional.communication`), measured by `python benchmarks/comm.py`.",
        "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `python benchmarks/comm.py"
        f"{' --quick' if args.quick else ''}`. Hardware: {os.cpu_count()}-core CPU ({platform.processor() or 'x86'}),"
        f" one process per rank with one thread each, gloo over the loopback interface (`GLOO_SOCKET_IFNAME=lo`),"
        f" torch {torch.__version__}, Python {platform.python_version()}. The machine is shared with other jobs"
        f" (load average {os.getloadavg()[0]:.1f} at the start): timings are noisy, bytes are not.",
        "",
        "## Bytes on the wire",
        "",
    ]
    for world in (2, 4):
        numel = sum(p.numel() for p in mlp(bytes_config["width"], bytes_config["depth"]).parameters())
        lines += bytes_table(world, run(world, "bytes", bytes_config), numel)
        print("\n".join(lines[-len(CASES) - 5 :]), flush=True)
    numel = sum(p.numel() for p in mlp(time_config["width"], time_config["depth"]).parameters())
    lines += ["## Step time", ""] + time_table(run(2, "time", time_config), numel)
    print("\n".join(lines[-len(CASES) - 5 :]), flush=True)
    lines += ["## Bytes per step and rank by world size (formula)", ""] + formula_table(numel) + NOTES
    print("\n".join(lines[-15:]))
    if not args.quick:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        # the training-outcome section is benchmarks/comm_outcomes.py's: kept as it is
        _, section, outcomes = output.read_text().partition("## Training outcome") if output.exists() else ("", "", "")
        output.write_text("\n".join(lines) + (f"\n{section}{outcomes}" if section else ""))
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
