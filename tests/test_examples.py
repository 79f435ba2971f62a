"""The demo runs end to end (a few steps) and reports what it promises; the outcome benchmark's tests are in
``tests/test_clipping_outcomes.py``."""

from __future__ import annotations


import pytest
import torch

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
