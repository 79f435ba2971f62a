"""The clipping outcome suite (``benchmarks/outcomes.py``): its judging, its command line, and a real slice of it.

The slice trains one healthy and one exploding workload of the suite for real (``Trainer.fit``, one seed, their
full step counts, a few seconds in all): without clipping the exploding run diverges while Lightning's
``gradient_clip_val`` at the value that is best for it does not, and the package's default, ``GradientClipping()``,
leaves the healthy run within the healthy tolerance and keeps the exploding one from diverging. The full tables over
three seeds and every workload are ``python benchmarks/outcomes.py --jobs 2``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import outcomes
from benchmarks.candidates import CANDIDATES, RECOMMENDED

HEALTHY, EXPLODING, BEST_CLIP_VAL = "mlp_blobs", "deep_mlp", "clip_val=1"


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(workload: str, method: str) -> dict:
    return outcomes.run_case(workload, method, seed=0, steps=outcomes.SUITE[workload].steps)


def test_the_default_leaves_a_healthy_run_alone_and_rescues_an_exploding_one():
    unclipped = _run(EXPLODING, "none")
    assert unclipped["diverged"], "the exploding workload must diverge without clipping, or the slice says nothing"
    assert not _run(EXPLODING, BEST_CLIP_VAL)["diverged"]
    rescued = _run(EXPLODING, outcomes.PACKAGE_DEFAULT)
    assert not rescued["diverged"] and math.isfinite(rescued["final_loss"])

    reference = _run(HEALTHY, "none")
    healthy = _run(HEALTHY, outcomes.PACKAGE_DEFAULT)
    tolerance = max(outcomes.HEALTHY_TOLERANCE * reference["final_loss"], outcomes.HEALTHY_ABSOLUTE)
    assert healthy["final_loss"] <= reference["final_loss"] + tolerance, (healthy, reference)


def _result(workload: str, method: str, seed: int, loss: float, diverged: bool = False) -> dict:
    return {
        "workload": workload,
        "method": method,
        "seed": seed,
        "final_loss": loss,
        "divergence_threshold": 2.0,
        "diverged": diverged,
    }


@pytest.mark.parametrize("workload", ["linear_sgd", "lstm_words_sgd20"])
def test_the_package_default_trains_as_the_chosen_candidate(workload):
    """``GradientClipping()`` is the rule chosen on the selection set (``benchmarks/candidates.py``), in one real
    healthy run its whole-model predecessor stalled and one exploding run it rescues."""
    package, candidate = _run(workload, outcomes.PACKAGE_DEFAULT), _run(workload, f"candidate {RECOMMENDED}")
    assert package["final_loss"] == pytest.approx(candidate["final_loss"], rel=1e-4)
    assert package["clipped_steps"] is None and candidate["clipped_steps"] >= (workload != "linear_sgd")


def test_judging_against_no_clipping_and_the_best_clip_value():
    results = [
        _result("mlp_blobs", "none", 0, 0.100),
        _result("mlp_blobs", "rule", 0, 0.105),  # +5%, but within the 0.01 absolute tolerance
        _result("deep_mlp", "clip_val=1", 0, 0.5),
        _result("deep_mlp", "clip_val=3", 0, 0.4, diverged=True),  # diverged: not eligible as the best value
        _result("deep_mlp", "clip_val=10", 0, 0.8),
        _result("deep_mlp", "rule", 0, float("nan"), diverged=True),  # counts as learning nothing: loss 2.0
    ]
    verdict = outcomes.judge(results, ["mlp_blobs", "deep_mlp"], ["none", "rule"])
    assert verdict["references"]["deep_mlp"] == {"label": "clip_val=1", "loss": 0.5}
    healthy, exploding = verdict["cells"]["rule"]["mlp_blobs"], verdict["cells"]["rule"]["deep_mlp"]
    assert healthy["regret"] == pytest.approx(0.05) and healthy["met"]
    assert exploding["regret"] == pytest.approx(3.0) and exploding["diverged"] == 1 and not exploding["met"]
    (row,) = [r for r in outcomes.summary_rows(verdict, ["mlp_blobs", "deep_mlp"], ["rule"])]
    assert (row["healthy_met"], row["exploding_met"], row["worst"]) == (1, 0, pytest.approx(3.0))


def test_quick_run_writes_json_and_the_report(tmp_path, capsys):
    json_path, report = tmp_path / "results.json", tmp_path / "outcomes.md"
    report.write_text(
        "# Outcomes\n\nwritten by hand\n\n<!-- outcomes:start -->\nstale report\n<!-- outcomes:end -->\ntail\n"
    )
    methods = ["none", "clip_val=1", "zclip", "autoclip", f"candidate {RECOMMENDED}"]
    argv = ["--quick", "--workloads", "mlp_blobs", "deep_mlp", "--methods", *methods, "--jobs", "1"]
    outcomes.main([*argv, "--json", str(json_path), "--markdown", str(report)])
    out = capsys.readouterr().out

    results = json.loads(json_path.read_text())
    assert [(r["workload"], r["method"]) for r in results] == [
        (w, m) for w in ("mlp_blobs", "deep_mlp") for m in methods
    ]
    assert all(r["steps"] == outcomes.QUICK_STEPS and r["seed"] == 0 for r in results)
    text = report.read_text()
    assert text.startswith("# Outcomes\n\nwritten by hand\n") and text.endswith("<!-- outcomes:end -->\ntail\n")
    assert "stale report" not in text and "python benchmarks/outcomes.py --quick" in text
    for method in methods:
        assert f"| {method} |" in out and f"| {method} |" in text


def test_method_names_and_bad_methods():
    names = outcomes.method_names()
    assert {"none", "zclip", "autoclip", outcomes.PACKAGE_DEFAULT} <= set(names)
    assert sum(n.startswith("clip_val=") for n in names) == 7
    assert {f"candidate {name}" for name in CANDIDATES} <= set(names)
    assert outcomes.PACKAGE_DEFAULT not in outcomes.default_methods()
    with pytest.raises(SystemExit):
        outcomes.main(["--methods", "no such method"])
    with pytest.raises(ValueError, match="Expected `method` to be one of"):
        outcomes.trainer_setup("no such method")
