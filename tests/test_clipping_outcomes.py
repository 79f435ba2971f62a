"""The default GradientClipping() rescues exploding workloads without a hand-tuned threshold and reaches the best
fixed ``gradient_clip_val`` of a sweep (small runs, one seed; the full table over three seeds and all workloads is
``python benchmarks/clip_outcomes.py --jobs 2``, whose runs these are)."""

import math

import pytest

from benchmarks.clip_outcomes import TOLERANCE, train

SWEEP = (0.1, 1.0, 10.0)


@pytest.mark.parametrize(("workload", "steps"), [("rnn", 120), ("transformer", 80)])
def test_default_reaches_the_best_fixed_clip_value(workload, steps):
    """Without clipping the run diverges; with ``GradientClipping()`` it does not, and its held-out loss is at most
    the best of Lightning's ``gradient_clip_val`` at 0.1, 1 and 10 (within the benchmark's 2% tolerance)."""
    unclipped = train(workload, "test", 0, steps, clip=None, default=False)
    assert unclipped["diverged"]
    fixed = {clip: train(workload, "test", 0, steps, clip=clip, default=False) for clip in SWEEP}
    survivors = [r["final_loss"] for r in fixed.values() if not r["diverged"]]
    assert survivors, "some fixed threshold of the sweep must work, or the comparison says nothing"
    default = train(workload, "test", 0, steps, clip=None, default=True)
    assert not default["diverged"] and math.isfinite(default["final_loss"])
    assert default["final_loss"] <= min(survivors) * (1 + TOLERANCE), (default["final_loss"], fixed)
