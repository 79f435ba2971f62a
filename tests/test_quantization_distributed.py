"""GradientQuantization under real 2-process DDP and FSDP2 (gloo on the CPU)."""

import pytest

from tests.helpers.dist import run_workers
from tests.helpers.tb import read_scalars

pytestmark = pytest.mark.distributed

MAX_STEPS = 4
QUANTIZATION = dict(method="stochastic", bits=4, error_feedback=True, block_size=16)


def test_ddp_replicated_parameters_stay_bitwise_identical(tmp_path):
    results = run_workers("quant_train", tmp_path, strategy="ddp", quantization=QUANTIZATION, max_steps=MAX_STEPS)
    rank0, rank1 = results
    # identical draws on identical (all-reduced) gradients: parameters and residuals agree bitwise
    assert rank0["params"] == rank1["params"]
    assert rank0["residuals"] == rank1["residuals"]
    assert any(any(v != 0 for v in r) for r in rank0["residuals"].values())
    assert rank0["syncs"] == rank1["syncs"] == [0] * MAX_STEPS
    logged = read_scalars(tmp_path / "logs" / "version_0")
    assert sorted(logged["gradguard/quant/rel_error"]) == list(range(MAX_STEPS))
    assert all(0 < v < 0.5 for v in logged["gradguard/quant/rel_error"].values())


def test_fsdp2_shards_draw_consistently_and_resume_bitwise(tmp_path):
    results = run_workers(
        "quant_train", tmp_path, strategy="fsdp2", quantization=QUANTIZATION, max_steps=MAX_STEPS, resume=True
    )
    rank0, rank1 = results
    for r in results:
        # each rank's quantized shard is the standalone quantizer's result on that shard: nothing else enters it
        assert r["reproduced"]
        assert r["syncs"] == [0] * MAX_STEPS
        # the run resumed from the step-2 distributed checkpoint (residual shards gathered into the callback state,
        # scattered back on load) ends bitwise where the uninterrupted run ended
        assert r["resumed_params"] == r["params"]
    assert rank0["params"] == rank1["params"]  # full tensors, gathered
    # the residuals are per shard: the two ranks hold different parts
    assert rank0["residuals"] != rank1["residuals"]
    # same local values: distinct shards draw independently, replicas of one shard draw the same numbers
    assert rank0["draws"]["sharded"] != rank1["draws"]["sharded"]
    assert rank0["draws"]["replicated"] == rank1["draws"]["replicated"]
