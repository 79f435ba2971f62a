"""The default GradientClipping() rescues an exploding workload without a hand-tuned threshold (small runs; the full
table with a fixed-threshold sweep and more seeds is ``benchmarks/clip_outcomes.py``, whose runs these are)."""

import math

import pytest

from benchmarks.clip_outcomes import train

STEPS = 60


@pytest.mark.parametrize("seed", [0, 1])
def test_default_rescues_the_deep_unnormalised_mlp(seed):
    """Without clipping the deep ReLU MLP's first updates throw it to NaN; with ``GradientClipping()`` it learns
    (the held-out loss ends below chance, ln 10)."""
    unclipped = train("mlp", "test", seed, STEPS, clip=None, default=False)
    assert unclipped["diverged"]
    clipped = train("mlp", "test", seed, STEPS, clip=None, default=True)
    assert not clipped["diverged"]
    assert math.isfinite(clipped["final_loss"]) and clipped["final_loss"] < math.log(10) - 0.1
