"""GradientQuantization under real 2-process DDP and FSDP2 (gloo on the CPU), quantizing after the gradient
reduction or in it (``compress_communication=True``)."""

import pytest
import torch

from lightning_gradguard.functional.communication import wire_bytes
from tests.helpers.dist import run_workers
from lightning_gradguard.events import read_jsonl
from tests.helpers.tb import read_layout, read_scalars

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


# ---------------------------------------------------------------------------------------------------------------
# compress_communication=True: one 2-process run (tests/workers/comm_train.py) and its resumes, checked below


COMPRESSED = dict(
    quantization=dict(method="stochastic", bits=4, block_size=16, compress_communication=True),
    max_steps=8,
    nan_step=3,
    spike_steps=[4, 5],  # the first is skipped, the second rewinds
    snapshot_step=2,  # the guard's last snapshot then: the last healthy step (snapshot_interval=1)
    checkpoint_step=7,
)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    return out, run_workers("comm_train", out, **COMPRESSED)


def _steps(record: dict) -> dict:
    return {int(step): value for step, value in record.items()}


def test_compressed_replicas_stay_bitwise_identical_every_step(compressed):
    _, (rank0, rank1) = compressed
    assert sorted(_steps(rank0["params"])) == list(range(COMPRESSED["max_steps"]))
    assert rank0["params"] == rank1["params"]
    # error feedback is on (4 bits) and each rank's residuals are its own
    assert rank0["saved"][0] != rank0["saved"][1] and any(rank0["saved"][0])


def test_compressed_bytes_and_ratio_are_logged_every_step(compressed):
    out, (rank0, _) = compressed
    logged = read_scalars(out / "logs" / "version_0")
    expected = wire_bytes(rank0["numel"], 2, 4, COMPRESSED["quantization"]["block_size"])  # one DDP bucket
    fp32 = 8 * (2 - 1) * rank0["numel"] // 2
    steps = list(range(COMPRESSED["max_steps"]))
    assert sorted(logged["gradguard/comm/bytes"]) == sorted(logged["gradguard/quant/rel_error"]) == steps
    assert set(logged["gradguard/comm/bytes"].values()) == {expected}
    assert logged["gradguard/comm/ratio"] == pytest.approx(dict.fromkeys(steps, fp32 / expected))
    assert all(counted == [expected, pytest.approx(fp32 / expected)] for counted in rank0["bytes"].values())
    assert "gradguard/quant/clamped" not in logged  # nothing is quantized a second time
    layout = read_layout(out / "logs" / "version_0")["gradguard"]
    assert any("comm/" in tag for tag in layout["communication"])


def test_nan_before_the_reduction_names_its_rank_and_leaves_the_residuals(compressed):
    _, ranks = compressed
    events = read_jsonl(ranks[0]["events_path"])
    nan = [e for e in events if e.kind == "nonfinite"]
    assert [(e.step, e.rank, e.action) for e in nan] == [(COMPRESSED["nan_step"], 1, "skipped")]
    for r in ranks:
        start, decisions = _steps(r["start"]), _steps(r["decisions"])
        assert decisions[COMPRESSED["nan_step"]] == [1, 0]  # skipped on both ranks
        assert start[COMPRESSED["nan_step"] + 1] == start[COMPRESSED["nan_step"]]


def test_skipped_step_is_undone_and_rewind_restores_the_snapshot_residuals(compressed):
    _, ranks = compressed
    skip, rewind = COMPRESSED["spike_steps"]
    for r in ranks:
        start, after_hook, decisions = _steps(r["start"]), _steps(r["after_hook"]), _steps(r["decisions"])
        assert decisions[skip] == [2, 0] and decisions[rewind] == [3, 1]
        # the hook updated the residuals during the skipped step; the skip put back those from before it
        assert after_hook[skip] != start[skip] and start[skip + 1] == start[skip]
        # the rewind restored the residuals from before the snapshot's step, not the latest ones nor zeros
        assert start[rewind + 1] == start[COMPRESSED["snapshot_step"]] != start[rewind]
        assert any(start[rewind + 1])


def test_resume_restores_every_ranks_own_residuals(compressed):
    _, ranks = compressed
    for r in ranks:
        assert r["saved_world_size"] == [2, 2]
        own = r["saved"][r["rank"]]
        assert own == _steps(r["start"])[COMPRESSED["checkpoint_step"]]  # saved: every rank's, gathered to rank 0
        assert r["resumed"]["before"] == own and not r["resumed"]["warnings"]  # loaded: this rank's own
        # DDP's first iteration after a start orders its bucket otherwise, so other elements share a scale and a
        # draw: the resumed step differs from the uninterrupted one by quantization noise, well below the step
        last = COMPRESSED["max_steps"] - 1
        before, final, resumed = (torch.tensor(p["net.0.weight"]) for p in
                                  (r["params"][str(last - 1)], r["params"][str(last)], r["resumed"]["params"]))
        assert 0 < (resumed - final).norm() < 0.5 * (final - before).norm()


@pytest.mark.parametrize("case, message", [("four", "world size 4"), ("layout", "bucket layout {0: [(3, 5)]}")])
def test_resume_on_another_world_size_or_layout_warns_and_resets(compressed, case, message):
    _, ranks = compressed
    for r in ranks:
        (warning,) = r[case]["warnings"]
        assert message in warning and "restarts from zero" in warning
        assert not any(r[case]["before"])
