"""ExplosionGuard under real 2-process DDP and FSDP2 (gloo on the CPU): same response on every rank, events once."""

import math

import pytest

from lightning_gradguard.events import read_jsonl
from tests.helpers.dist import run_workers
from tests.helpers.tb import read_scalars

pytestmark = pytest.mark.distributed

NAN_STEP, LOCAL_FAULT_STEP, BLOWUP_STEPS, SNAPSHOT_INTERVAL, MAX_STEPS = 2, 4, [7, 8], 3, 11
SNAPSHOT_STEP = 6  # the last healthy multiple of SNAPSHOT_INTERVAL before the blow-up


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_nan_on_one_rank_gets_the_same_response_on_every_rank(strategy, tmp_path):
    results = run_workers(
        "guard_nan_rank",
        tmp_path,
        strategy=strategy,
        nan_step=NAN_STEP,
        local_fault_step=LOCAL_FAULT_STEP,
        blowup_steps=BLOWUP_STEPS,
        snapshot_interval=SNAPSHOT_INTERVAL,
        snapshot_step=SNAPSHOT_STEP,
        max_steps=MAX_STEPS,
    )
    rank0, rank1 = results

    # every rank took the same decision at every step: skip the NaN step, skip the first blow-up step, rewind at
    # the second (rewind_patience=2), train normally otherwise
    assert rank0["decisions"] == rank1["decisions"]
    skipped_steps = [s for s, skipped, _ in rank0["decisions"] if skipped]
    assert skipped_steps == [NAN_STEP, LOCAL_FAULT_STEP, *BLOWUP_STEPS]
    assert [rewinds for _, _, rewinds in rank0["decisions"]][BLOWUP_STEPS[-1]] == 1
    assert rank0["skipped"] == rank1["skipped"] == 4 and rank0["rewinds"] == rank1["rewinds"] == 1

    # the rewind restored every rank's parameters (local shards under FSDP2) to the snapshot, bitwise
    for result in results:
        assert result["after_rewind_params"] == result["snapshot_params"]
    # replicated parameters stay identical, and finite
    assert rank0["params"] == rank1["params"]
    assert all(math.isfinite(v) for values in rank0["params"].values() for v in values)

    # events are written once, by rank 0, and name the rank whose batch produced the NaN; the fault rank 1 alone
    # saw after the reduction is recorded by rank 0 all the same
    assert rank1["events_path"] is None
    log_dir = tmp_path / "logs" / "version_0"
    events = read_jsonl(log_dir / "gradguard_events.jsonl")
    nonfinite = [e for e in events if e.kind == "nonfinite"]
    assert [(e.step, e.action, e.rank) for e in nonfinite] == [
        (NAN_STEP, "skipped", 1),
        (LOCAL_FAULT_STEP, "skipped", 1),
    ]
    spikes = [(e.step, e.action, e.rank) for e in events if e.kind == "loss_spike"]
    assert spikes == [(BLOWUP_STEPS[0], "skipped", 0), (BLOWUP_STEPS[1], "rewound", 0)]
    assert len(events) == len({(e.step, e.kind) for e in events}), "no event written twice"
    scalars = read_scalars(log_dir)
    assert scalars["gradguard/guard/rewinds"] == {BLOWUP_STEPS[1]: 1.0}
    assert scalars["gradguard/events/nonfinite"] == {NAN_STEP: 1.0, LOCAL_FAULT_STEP: 2.0}
