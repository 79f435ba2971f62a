"""The quantized all-reduce DDP hook (lightning_gradguard.functional.communication): code packing and arguments in
one process; real 2-process gloo runs of torch's DistributedDataParallel with the hook registered."""

import copy
import io
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_gradguard.functional.communication import (
    QuantizedCommState,
    pack_codes,
    quantized_allreduce_hook,
    unpack_codes,
    wire_bytes,
)
from lightning_gradguard.utilities import HostSyncCounter

WORLD = 2
STEPS = 4
CONFIGS = {
    "stochastic8": dict(method="stochastic", bits=8),
    "stochastic4": dict(method="stochastic", bits=4),
    "stochastic2": dict(method="stochastic", bits=2),
    "qsgd": dict(method="qsgd", levels=5),
    "terngrad": dict(method="terngrad"),
    "sign": dict(method="sign"),
}
DRAWS = 400


@pytest.mark.parametrize("width", range(1, 9))
def test_pack_unpack_round_trip(width):
    codes = torch.randint(0, 2**width, (8 * 37,), dtype=torch.uint8, generator=torch.Generator().manual_seed(width))
    packed = pack_codes(codes, width)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * width // 8
    assert torch.equal(unpack_codes(packed, width), codes)


def test_pack_bit_order():
    # 1-bit codes: the first code is the lowest bit of the first byte
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [129]
    # 3-bit codes straddle bytes: 8 codes fill 3 bytes
    codes = torch.tensor([7, 0, 0, 0, 0, 0, 0, 5], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [7, 0, 5 << 5]
    assert pack_codes(torch.tensor([1, 0, 3, 2, 0, 1, 1, 3], dtype=torch.uint8), 2).tolist() == [177, 212]


def test_wire_bytes():
    # 4 ranks, 2 blocks of 1256 elements per chunk: (4 + 1256) * 2 bytes per chunk and hop, to 3 ranks, plus a flag
    assert wire_bytes(10_000, 4, 8) == 3 * (2 * 2 * (4 + 1256) + 1) == 15123
    assert wire_bytes(10_000, 4, 1) == 3 * (2 * 2 * (4 + 1256 // 8) + 1)


@pytest.mark.parametrize(
    "kwargs, width, feedback",
    [
        (dict(), 8, True),
        (dict(bits=4), 4, True),
        (dict(bits=2), 2, False),
        (dict(method="qsgd", levels=5), 4, False),
        (dict(method="qsgd"), 8, True),
        (dict(method="terngrad"), 2, False),
        (dict(method="sign"), 1, True),
        (dict(bits=2, error_feedback=True), 2, True),
    ],
)
def test_code_width_and_error_feedback_default(kwargs, width, feedback):
    state = QuantizedCommState(**kwargs)
    assert (state.width, state.error_feedback) == (width, feedback)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="int8"), ValueError, "Expected `method` to be one of"),
        (dict(bits=9), ValueError, r"Expected `bits` to be an integer in \[2, 8\] but got 9"),
        (dict(method="sign", bits=4), ValueError, "`bits` does not apply to method='sign'"),
        (dict(method="terngrad", bits=2), ValueError, "`bits` does not apply to method='terngrad'"),
        (dict(levels=3), ValueError, "`levels` applies to method='qsgd' only"),
        (dict(method="qsgd", levels=200), ValueError, r"Expected `levels` to be an integer in \[1, 127\] but got 200"),
        (dict(method="qsgd", bits=4, levels=3), ValueError, "at most one of `bits` and `levels`"),
        (dict(block_size=0), ValueError, "Expected `block_size` to be an integer >= 1 but got 0"),
        (dict(error_feedback=1), TypeError, "Expected `error_feedback` to be a bool or None but got int"),
        (dict(method="sign", error_feedback=False), ValueError, "always uses error feedback"),
        (dict(seed=-2), ValueError, "Expected `seed` to be an integer >= 0 but got -2"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizedCommState(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# 2-process runs: every scenario runs once in one spawn (module fixture); the tests check its records.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


class _Model(nn.Sequential):
    def __init__(self, hidden: int = 64) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 48), nn.ReLU(), nn.Linear(48, 8))


def _wrap(model, config):
    # buckets of ~1300 floats: several per model once DDP has rebuilt them after the first iteration
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.005)
    state = QuantizedCommState(**config)
    ddp.register_comm_hook(state, quantized_allreduce_hook)
    return ddp, state


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _residuals(state, sd=None) -> torch.Tensor:
    residuals = (sd or state.state_dict())["residuals"]
    return _flat([residuals[k] for k in sorted(residuals)]) if residuals else torch.zeros(1)


def _sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _gathered_equal(t: torch.Tensor) -> bool:
    """Whether every rank holds the same bits (NaN included)."""
    bits = t.contiguous().view(torch.int32)
    parts = [torch.empty_like(bits) for _ in range(WORLD)]
    dist.all_gather(parts, bits)
    return all(torch.equal(parts[0], p) for p in parts)


class _SentBytes:
    """Bytes this rank puts on the wire, from the tensors handed to the collectives."""

    def __init__(self) -> None:
        self.total = 0
        self.all_to_all, self.all_gather = dist.all_to_all_single, dist.all_gather_single
        dist.all_to_all_single, dist.all_gather_single = self._all_to_all, self._all_gather

    def _all_to_all(self, out, inp, *args, **kwargs):
        self.total += inp.numel() * inp.element_size() * (WORLD - 1) // WORLD  # its own slice stays local
        return self.all_to_all(out, inp, *args, **kwargs)

    def _all_gather(self, out, inp, *args, **kwargs):
        self.total += inp.numel() * inp.element_size() * (WORLD - 1)
        return self.all_gather(out, inp, *args, **kwargs)


def _step(ddp, state, batch, sent=None, update=True) -> dict:
    """One SGD step through the hooked DDP; checks against the float32 average and the error-feedback identity."""
    x, y = batch
    params = list(ddp.module.parameters())
    local = _flat(torch.autograd.grad(nn.functional.mse_loss(ddp.module(x), y), params))  # never enters DDP
    before = _residuals(state)
    start = sent.total if sent else 0
    ddp.zero_grad()
    nn.functional.mse_loss(ddp(x), y).backward()
    average = _flat([p.grad for p in params])
    reference = _sum(local) / WORLD
    stats = state.stats
    record = {
        "average": average,
        "finite": bool(torch.isfinite(average).all()),
        "nonfinite_grads": [not bool(torch.isfinite(p.grad).all()) for p in params],
        "nonfinite_ranks": stats.nonfinite_ranks.tolist(),
        "same_grads": _gathered_equal(average),
        "rel_to_fp32": float((average - reference).norm() / reference.norm()),
        "rel_error": float(stats.rel_error),
        "bytes": stats.bytes_sent,
        "ratio": stats.ratio,
        "sent": (sent.total - start) if sent else None,
        "residual_before": before,
        "residual_after": _residuals(state),
    }
    if record["finite"]:
        # W * average = sum of gradients + sum of the residuals before - sum of the residuals after
        expected = _sum(local) + _sum(before) - _sum(record["residual_after"]) if state.error_feedback else None
        record["identity"] = (
            float((WORLD * average - expected).abs().max() / expected.abs().max()) if expected is not None else 0.0
        )
    if update:  # a step with a non-finite gradient is skipped, as a guard would
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
    record["same_params"] = _gathered_equal(_flat(params).detach())
    return record


def _batches(rank: int, count: int) -> list:
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)) for _ in range(count)]


class _FakeBucket:
    """What the hook reads of a ``dist.GradBucket``: one bucket, index 0 (so every call is a step)."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.param = values, torch.zeros_like(values)

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def buffer(self) -> torch.Tensor:
        return self.values

    def parameters(self) -> list:
        return [self.param]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result: dict = {"rank": rank}
    sent = _SentBytes()
    batches = _batches(rank, 8)

    # every method: a few real steps (the buckets are rebuilt after the first)
    for name, config in CONFIGS.items():
        ddp, state = _wrap(_Model(), config)
        result[name] = [_step(ddp, state, b, sent) for b in batches[:STEPS]]

    # a NaN in one gradient element on rank 1 at step 1
    ddp, state = _wrap(_Model(), CONFIGS["stochastic8"])
    records = [_step(ddp, state, batches[0])]
    target = ddp.module[2].weight
    if rank == 1:
        handle = target.register_hook(lambda g: g.flatten().index_fill(0, torch.tensor([5]), math.nan).view_as(g))
    records.append(_step(ddp, state, batches[1], update=False))
    if rank == 1:
        handle.remove()
    records.append(_step(ddp, state, batches[2]))
    result["nan"] = records
    result["nan_param"] = [p is target for p in ddp.module.parameters()]

    # state: undo, live reload, resume in a fresh DDP, mismatches
    ddp, state = _wrap(_Model(), CONFIGS["stochastic8"])
    steps = [_step(ddp, state, b) for b in batches[:3]]
    saved = torch.load(io.BytesIO(_saved_bytes(state.state_dict())), weights_only=False)
    params = copy.deepcopy(ddp.module.state_dict())
    steps.append(_step(ddp, state, batches[3]))
    after = _residuals(state)
    state.undo_step()
    restored = _residuals(state)
    result["undo"] = [torch.equal(restored, _residuals(None, saved)), not torch.equal(after, restored)]
    state.undo_step()
    result["undo"].append(torch.equal(_residuals(state), _residuals(None, saved)))
    ddp.module.load_state_dict(params)
    state.load_state_dict(saved)
    again = _step(ddp, state, batches[3])
    result["reload"] = [torch.equal(again[k], steps[-1][k]) for k in ("residual_after", "average")]
    fresh_ddp, fresh = _wrap(copy.deepcopy(ddp.module), CONFIGS["stochastic8"])
    fresh.load_state_dict(state.state_dict())
    result["resume"] = [_step(fresh_ddp, fresh, b) for b in batches[4:7]]
    result["residuals_differ"] = not _gathered_equal(after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict({**saved, "world_size": 3})
        result["world_warning"] = [str(w.message) for w in caught]
        result["world_reset"] = not _residuals(fresh).any()
        caught.clear()
        other_ddp, other = _wrap(_Model(hidden=40), CONFIGS["stochastic8"])
        other.load_state_dict(saved)
        x, y = batches[0]
        nn.functional.mse_loss(other_ddp(x), y).backward()
        result["layout_warning"] = [str(w.message) for w in caught]

    # unbiasedness of the two hops: many draws of the average of two fixed vectors, 2-bit, no error feedback
    values = torch.randn(512, generator=torch.Generator().manual_seed(7 + rank))
    state = QuantizedCommState("stochastic", bits=2, block_size=128)
    draws, result["syncs"] = [], []
    for _ in range(DRAWS):
        with HostSyncCounter() as counter:  # DDP's thread: the first hop and the accounting
            future = quantized_allreduce_hook(state, _FakeBucket(values.clone()))
        result["syncs"].append(counter.total)
        draws.append(future.wait())
    result["draws"], result["target"] = torch.stack(draws), _sum(values) / WORLD
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _saved_bytes(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CONFIGS))
def test_replicas_bitwise_identical_and_close_to_fp32(ranks, name):
    for records in (r[name] for r in ranks):
        assert all(s["same_grads"] and s["same_params"] for s in records)
        assert all(s["finite"] and s["nonfinite_ranks"] == [False] * WORLD for s in records)
        # the per-step error-feedback identity, to float32 rounding; at step 1 it holds only if the residuals
        # followed their parameters into the buckets DDP rebuilt after the first iteration
        assert all(s["identity"] < 1e-5 for s in records), [s["identity"] for s in records]
    # no residual yet at the first step: the difference to float32 is the error of the two quantizations, each of
    # about the relative size of the first hop's
    first = ranks[0][name][0]
    assert 0 < first["rel_to_fp32"] < 2.5 * max(r[name][0]["rel_error"] for r in ranks)
    if name == "stochastic8":
        assert all(s["rel_to_fp32"] < 0.1 for s in ranks[0][name])


@pytest.mark.distributed
@pytest.mark.parametrize("name, low", [("stochastic8", 3.9), ("stochastic4", 7.7), ("stochastic2", 15), ("sign", 30)])
def test_bytes_counted_are_the_bytes_sent(ranks, name, low):
    for records in (r[name] for r in ranks):
        assert all(s["bytes"] == s["sent"] for s in records)
        assert all(s["ratio"] > low for s in records)


@pytest.mark.distributed
def test_residuals_differ_per_rank(ranks):
    assert ranks[0]["residuals_differ"]
    assert not torch.equal(ranks[0]["stochastic8"][-1]["residual_after"], ranks[1]["stochastic8"][-1]["residual_after"])


@pytest.mark.distributed
def test_nan_on_one_rank_is_named_and_spares_the_residuals(ranks):
    position = ranks[0]["nan_param"].index(True)
    for r in ranks:
        healthy, poisoned, recovered = r["nan"]
        assert poisoned["nonfinite_ranks"] == [False, True]  # on both ranks: rank 1 sent the NaN
        assert not poisoned["finite"] and poisoned["nonfinite_grads"][position]
        assert torch.equal(poisoned["residual_after"], poisoned["residual_before"])  # no rank's residual moved
        assert poisoned["same_grads"]
        assert recovered["finite"] and recovered["nonfinite_ranks"] == [False, False]
        assert not torch.equal(recovered["residual_after"], recovered["residual_before"])


@pytest.mark.distributed
def test_undo_restores_the_residuals_of_the_step_before(ranks):
    for r in ranks:
        assert r["undo"] == [True, True, True]


@pytest.mark.distributed
def test_state_round_trip_live_and_in_a_fresh_ddp(ranks):
    for r in ranks:
        assert r["reload"] == [True, True]  # the same step again: the same average and residual, bitwise
        # a fresh DDP (first-iteration buckets, then rebuilt) continues from the loaded residuals: the identity
        # with the loaded residual as the starting point holds at every step
        assert all(s["finite"] and s["identity"] < 1e-5 and s["same_params"] for s in r["resume"])


@pytest.mark.distributed
def test_world_size_or_layout_mismatch_warns_and_resets(ranks):
    for r in ranks:
        assert any("world size 3" in m and "restarts from zero" in m for m in r["world_warning"])
        assert r["world_reset"]
        assert any("bucket layout" in m and "restarts from zero" in m for m in r["layout_warning"])


@pytest.mark.distributed
def test_no_host_reads_on_ddp_thread(ranks):
    assert all(r["syncs"] == [0] * DRAWS for r in ranks)


@pytest.mark.distributed
def test_two_hops_are_unbiased(ranks):
    draws, target = ranks[0]["draws"].double(), ranks[0]["target"].double()
    assert torch.equal(draws, ranks[1]["draws"])  # every rank decodes the same bits
    var = draws.var(0)
    keep = var > 0
    assert keep.sum() > 400
    z = (draws.mean(0) - target)[keep] / (var[keep] / DRAWS).sqrt()
    assert z.abs().max() < 6.0
    assert 0.75 < z.square().mean() < 1.25
