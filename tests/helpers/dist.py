"""Real 2-process training on the CPU (gloo) for the distributed tests.

A test calls :func:`run_workers` with the name of a script in ``tests/workers/``. The script is started as a
subprocess; inside it a Lightning ``Trainer`` with ``devices=2`` launches the second rank by re-running the same
script (Lightning's subprocess launcher), exactly as a user's ``python train.py`` would. Each rank writes a JSON
result file with :func:`write_result`; the test gets the list of both ranks' results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = REPO_ROOT / "tests" / "workers"
WORLD_SIZE = 2


def run_workers(worker: str, out_dir: Path, strategy: str = "ddp", timeout: float = 300, **config: Any) -> list[dict]:
    """Run ``tests/workers/<worker>.py`` on 2 CPU processes and return each rank's result (rank order)."""
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"Expected `strategy` to be 'ddp' or 'fsdp2' but got {strategy!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        str(WORKERS / f"{worker}.py"),
        "--out",
        str(out_dir),
        "--strategy",
        strategy,
        "--config",
        json.dumps(config),
    ]
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"worker {worker} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    results = []
    for rank in range(WORLD_SIZE):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            raise AssertionError(f"worker {worker} wrote no result for rank {rank}:\n{proc.stderr[-8000:]}")
        results.append(json.loads(path.read_text()))
    return results
