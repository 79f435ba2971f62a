"""GradientNormMonitor under real 2-process DDP and FSDP2 (gloo on the CPU)."""

import pytest
from lightning.pytorch.callbacks import Callback

from tests.helpers.dist import run_workers
from tests.helpers.models import tiny_trainer
from tests.helpers.tb import read_scalars
from tests.workers.common import ShardableRegressor

pytestmark = pytest.mark.distributed

MAX_STEPS = 5


class Recorder(Callback):
    def __init__(self):
        self.total, self.per_tensor = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        import torch

        grads = [p.grad for p in pl_module.parameters()]
        self.total.append(torch.nn.utils.get_total_norm(grads).item())
        self.per_tensor.append({n: p.grad.norm().item() for n, p in pl_module.named_parameters()})


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    """The same model on one process with the global batch (2 ranks x 8 samples)."""
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path_factory.mktemp("ref"), max_steps=MAX_STEPS, callbacks=[recorder])
    trainer.fit(ShardableRegressor(batch_size=16))
    return recorder


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_global_norm_on_every_rank_equals_single_process_norm(strategy, tmp_path, single_process_reference):
    results = run_workers("monitor_norms", tmp_path, strategy=strategy, max_steps=MAX_STEPS, batch_size=8)
    ref = single_process_reference
    for rank_result in results:
        seen = rank_result["seen"]
        assert [s["step"] for s in seen] == list(range(MAX_STEPS))
        assert [s["total"] for s in seen] == pytest.approx(ref.total, rel=1e-5)
        for step, s in enumerate(seen):
            assert s["per_tensor"] == pytest.approx(ref.per_tensor[step], rel=1e-5)
    # both ranks agree bitwise on the norm (the decision input of every later stage)
    assert [s["total"] for s in results[0]["seen"]] == [s["total"] for s in results[1]["seen"]]
    assert results[0]["params"] == results[1]["params"]

    # logs are written once, by rank 0: one event file, each step once
    log_dir = tmp_path / "logs" / "version_0"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    logged = read_scalars(log_dir)["gradguard/grad_norm"]
    assert sorted(logged) == list(range(MAX_STEPS))
    assert list(logged.values()) == pytest.approx(ref.total, rel=1e-5)
