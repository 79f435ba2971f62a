"""The demo and the outcome benchmark run end to end (a few steps each) and report what they promise."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import outcomes
from examples import demo
from tests.helpers.tb import read_scalars

STEPS = 4


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_demo_shows_the_explosion_and_writes_the_runs_side_by_side(tmp_path, capsys, restore_threads):
    log_dir = tmp_path / "gradguard_logs"
    results = demo.main(["--workload", "mlp", "--steps", str(STEPS), "--log-dir", str(log_dir)])
    out = capsys.readouterr().out

    assert [r.run for r in results] == list(demo.RUN_NAMES)
    no_guard = results[0]
    assert no_guard.diverged and no_guard.events > 0, "the demo workload must explode without a guard"
    for line in ("held-out loss", "diverged", "events", "skipped steps", "wall time", "tensorboard --logdir"):
        assert line in out
    for result in results:
        assert result.run in out and result.seconds > 0
        scalars = read_scalars(log_dir / result.run)
        assert sorted(scalars["gradguard/grad_norm"]) == list(range(STEPS)), result.run
    assert "gradguard/clip_coef" in read_scalars(log_dir / "gradguard")
    assert "gradguard/clip_coef" not in read_scalars(log_dir / "no_guard")

    # a second run replaces the curves of the first instead of adding a second series to the same directory
    demo.main(["--workload", "mlp", "--steps", "2", "--log-dir", str(log_dir)])
    assert sorted(read_scalars(log_dir / "gradguard")["gradguard/grad_norm"]) == [0, 1]


def test_outcome_benchmark_quick_run(tmp_path, capsys):
    json_path = tmp_path / "results.json"
    methods = ["none", "clip_val=1", "gradguard defaults", "zclip", "autoclip"]
    outcomes.main(["--quick", "--workloads", "mlp", "--methods", *methods, "--jobs", "1", "--json", str(json_path)])
    out = capsys.readouterr().out

    results = json.loads(json_path.read_text())
    assert [(r["workload"], r["method"], r["seed"]) for r in results] == [("mlp", m, 0) for m in methods]
    assert all(r["steps"] == outcomes.QUICK_STEPS for r in results)
    assert results[0]["diverged"], "the mlp workload explodes without clipping"
    assert "| method | median held-out loss | diverged | s / run |" in out
    for method in methods:
        assert f"| {method} |" in out


def test_outcome_benchmark_lists_the_peers_when_installed():
    names = outcomes.method_names()
    assert {"none", "gradguard defaults", "zclip", "autoclip"} <= set(names)
    assert sum(n.startswith("clip_val=") for n in names) == 3
    with pytest.raises(SystemExit):
        outcomes.main(["--methods", "no such method"])
