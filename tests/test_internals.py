"""The reads of Lightning's and torch's private state that gradguard relies on (``callbacks/_lightning.py``), pinned:
if a new release moves one, these fail before a user's run goes wrong quietly."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradguard.callbacks._lightning import (
    ddp_comm_hook,
    found_inf,
    grad_scaler,
    logging_step,
    loss_scale,
    takes_found_inf,
)
from tests.helpers.models import TinyMLP, tiny_trainer


class Probe(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("probe", 1.0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = grad_scaler(trainer)
        self.seen.append(
            (
                logging_step(trainer),
                trainer.global_step,
                None if scaler is None else float(loss_scale(scaler)),
                None if scaler is None else bool(found_inf(scaler, optimizer, torch.device("cpu"))),
            )
        )


def test_logging_step_counts_batches_that_stepped(tmp_path):
    probe = Probe()
    tiny_trainer(tmp_path, max_steps=6, accumulate_grad_batches=2, callbacks=[probe]).fit(TinyMLP())
    assert [(s, g) for s, g, _, _ in probe.seen] == [(i, i) for i in range(6)]


def test_grad_scaler_state_is_where_it_is_read(tmp_path):
    probe = Probe()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # overflows at first, then comes down
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    tiny_trainer(tmp_path, max_steps=12, plugins=[plugin], callbacks=[probe]).fit(TinyMLP())
    scales = [s for _, _, s, _ in probe.seen]
    overflows = [f for _, _, _, f in probe.seen]
    assert scales[0] == 2.0**100 and overflows[0]
    assert all(b == a / 2 for a, b, f in zip(scales, scales[1:], overflows) if f), "halved after each overflow"
    assert grad_scaler(tiny_trainer(tmp_path)) is None


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_fused_optimizers_take_the_found_inf_flag(cls):
    params = [nn.Parameter(torch.ones(3))]
    assert takes_found_inf(cls(params, lr=0.1, fused=True))
    assert not takes_found_inf(cls(params, lr=0.1))


def test_ddp_comm_hook_is_where_it_is_read():
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    assert ddp_comm_hook(DDPStrategy(ddp_comm_hook=fp16_compress_hook)) is fp16_compress_hook
    assert ddp_comm_hook(DDPStrategy()) is None
