"""GradientClipping under real 2-process DDP and FSDP2 (gloo on the CPU): every rank takes the same decision as a
single process with the global batch, and AdaGC / AGC see full-tensor (not shard) norms under FSDP2."""

import pytest

from tests.helpers.dist import run_workers
from tests.helpers.models import tiny_trainer
from tests.workers.clip_dist import callbacks_for
from tests.workers.common import ShardableRegressor

pytestmark = pytest.mark.distributed

MAX_STEPS = 8
SPIKES = {"5": 40.0}
CASES = {
    # the default rule under DDP and FSDP2 (its explosion trigger reads full-tensor weight norms); AdaGC (per-tensor)
    # plus a functional AGC probe (row norms of shards) under FSDP2
    "ddp": ("ddp", {"clipping": {}, "spikes": SPIKES}),
    "fsdp2": ("fsdp2", {"clipping": {"method": "adagc", "warmup_steps": 2}, "agc_probe": True, "spikes": SPIKES}),
    "fsdp2_default": ("fsdp2", {"clipping": {}, "spikes": SPIKES}),
}


def single_process(tmp_path, config):
    """The same model and callbacks on one process with the global batch (2 ranks x 8 samples)."""
    clipping, probe, callbacks = callbacks_for(config)
    trainer = tiny_trainer(tmp_path, max_steps=MAX_STEPS, callbacks=callbacks)
    trainer.fit(ShardableRegressor(batch_size=16))
    return clipping.seen, probe.seen if probe else []


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_agree_with_each_other_and_with_one_process(case, tmp_path):
    strategy, config = CASES[case]
    results = run_workers(
        "clip_dist", tmp_path / "dist", strategy=strategy, max_steps=MAX_STEPS, batch_size=8, **config
    )
    ref_seen, ref_agc = single_process(tmp_path / "ref", config)
    rank0, rank1 = results
    # the same threshold and coefficient on every rank, bit for bit, at every step
    for key in ("threshold", "coef", "clipped"):
        assert [s[key] for s in rank0["seen"]] == [s[key] for s in rank1["seen"]], key
        assert [s[key] for s in rank0["seen"]] == pytest.approx([s[key] for s in ref_seen], rel=1e-5), key
    assert min(s["coef"] for s in ref_seen) < 0.1, "the spike must be clipped"
    for result in results:
        for s in result["seen"]:
            # the per-tensor norms the rule used are the full-tensor norms, not the local shard's
            assert s["per_tensor"] == pytest.approx(s["full_per_tensor"], rel=1e-5)
            # the logged clipped norm is the norm of the clipped gradients
            assert s["clipped"] == pytest.approx(s["clipped_full"], rel=1e-5)
    assert rank0["params"] == rank1["params"], "replicated parameters stay identical"
    if config.get("agc_probe"):
        for key in ("threshold", "clipped"):
            assert [s[key] for s in rank0["agc"]] == [s[key] for s in rank1["agc"]], key
            assert [s[key] for s in rank0["agc"]] == pytest.approx([s[key] for s in ref_agc], rel=1e-5), key
        for s in rank0["agc"]:
            assert s["clipped"] == pytest.approx(s["clipped_full"], rel=1e-5)
