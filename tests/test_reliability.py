"""Runs that never go wrong quietly: rewinds across resumes, learning-rate cuts under every scheduler, mixed
precision, skipping without a host read, several optimizers, and where events go. Real ``Trainer.fit`` runs."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradguard import ExplosionGuard, GradientClipping, GradientExplosionError
from lightning_gradguard.events import read_jsonl
from tests.helpers.faults import Faults
from tests.helpers.models import TinyMLP, tiny_trainer
from tests.helpers.sync import counting

LAYER = "net.2.weight"


def logger(tmp_path, name="logs"):
    return CSVLogger(tmp_path, name=name, version=0)


class StepLR(Callback):
    """Per optimizer step: the learning rate the step is taken with (read inside it, after the guard's factor) and
    the one the schedule holds (read before it)."""

    def __init__(self):
        self.inside: dict[int, float] = {}
        self.schedule: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, *args):
            self.inside[trainer.global_step] = float(optimizer.param_groups[0]["lr"])

        trainer.optimizers[0].register_step_pre_hook(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.schedule[trainer.global_step] = float(trainer.optimizers[0].param_groups[0]["lr"])


# ---------------------------------------------------------------------------------------------------------------
# rewinds and resume
# ---------------------------------------------------------------------------------------------------------------


def _rewind_run(tmp_path, name, max_steps, spikes, patience, ckpt_path=None, ckpt_every=None):
    guard = ExplosionGuard(
        on_spike="rewind",
        window=16,
        warmup=8,
        snapshot_interval=10,
        rewind_patience=patience,
        lr_factor=0.5,
        max_consecutive_skips=None,
    )
    callbacks = [Faults(grads=dict.fromkeys(spikes, 1000.0), layer=LAYER), guard]
    if ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path / name / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1)
        )
    model = TinyMLP(num_samples=800)  # one epoch covers the run: the batches do not depend on where it resumes
    trainer = tiny_trainer(
        tmp_path,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger(tmp_path, name),
        enable_checkpointing=bool(ckpt_every),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return guard, model


@pytest.mark.parametrize(
    ("spikes", "patience"),
    [((38, 39), 2), ((34, 35, 36), 3)],
    ids=["spike-after-the-checkpoint", "streak-straddles-the-checkpoint"],
)
def test_a_rewind_after_resuming_between_snapshots(tmp_path, spikes, patience):
    """Checkpoint at step 35 (snapshots every 10 steps), resume, then a spike streak: the resumed run rewinds where
    the uninterrupted one does (to the state it resumed from), instead of stopping for want of a snapshot."""
    full, _ = _rewind_run(tmp_path, "full", 45, spikes, patience)
    _rewind_run(tmp_path, "part", 35, spikes, patience, ckpt_every=35)
    ckpt = next((tmp_path / "part" / "ckpt").glob("*step=35.ckpt"))
    resumed, model = _rewind_run(tmp_path, "part", 45, spikes, patience, ckpt_path=ckpt)
    assert full.rewinds == resumed.rewinds == 1 and full.skipped == resumed.skipped == patience
    decisions = lambda guard: [(e.step, e.kind, e.action) for e in read_jsonl(guard.events_path) if e.kind == "spike"]
    assert decisions(resumed) == decisions(full)
    assert decisions(full)[-1] == (spikes[-1], "spike", "rewound")
    assert all(torch.isfinite(p).all() for p in model.parameters())


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda s: 0.97),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 15], gamma=0.5),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=6),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=10),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=30, power=2.0),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=7),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.005, max_lr=0.02, step_size_up=5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=40),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97), torch.optim.lr_scheduler.StepLR(o, 5, 0.5)]
    ),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=5), torch.optim.lr_scheduler.CosineAnnealingLR(o, 20)],
        milestones=[5],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "custom": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** (s // 3) if s < 12 else 2.0),
}


def test_every_scheduler_of_torch_is_covered():
    schedulers = torch.optim.lr_scheduler
    public = {
        name
        for name, cls in vars(schedulers).items()
        if inspect.isclass(cls)
        and issubclass(cls, (schedulers.LRScheduler, schedulers.ReduceLROnPlateau))
        and not name.startswith("_")
        and name not in ("LRScheduler", "_LRScheduler")
    }
    assert public <= set(SCHEDULERS), public - set(SCHEDULERS)


class Scheduled(TinyMLP):
    def __init__(self, make, **kwargs):
        super().__init__(**kwargs)
        self.make = make

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        config = {"scheduler": self.make(optimizer), "interval": "step"}
        if isinstance(config["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "train_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_rewind_learning_rate_cut_holds_under_every_scheduler(tmp_path, name):
    """After a rewind with ``lr_factor=0.5`` every later step runs at half the rate its scheduler sets, whatever the
    scheduler computes from; and the step after the rewind uses the rate the snapshot step used."""
    snapshot, spikes = 10, (14, 15)
    probe = StepLR()
    # only the injected spikes are flagged: this is about learning rates, not detection
    guard = ExplosionGuard(
        on_spike="rewind",
        window=8,
        warmup=6,
        threshold=50.0,
        detect_loss=False,
        snapshot_interval=snapshot,
        rewind_patience=2,
        lr_factor=0.5,
    )
    callbacks = [Faults(grads=dict.fromkeys(spikes, 1000.0), layer=LAYER), guard, probe]
    trainer = tiny_trainer(tmp_path, max_steps=30, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(Scheduled(SCHEDULERS[name], num_samples=800))
    assert guard.rewinds == 1 and guard.lr_scale == 0.5
    rewound = spikes[-1]
    # the schedule goes on from the snapshot: the step after the rewind gets the snapshot step's rate
    assert probe.schedule[rewound + 1] == pytest.approx(probe.schedule[snapshot], rel=1e-6)
    for step in range(30):
        factor = 0.5 if step > rewound else 1.0
        assert probe.inside[step] == pytest.approx(factor * probe.schedule[step], rel=1e-6), step
    final = trainer.optimizers[0].param_groups[0]["lr"]
    assert final == pytest.approx(trainer.lr_scheduler_configs[0].scheduler.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("schedule_on_skip", ["advance", "hold"])
def test_skipped_steps_advance_or_hold_the_schedule(tmp_path, schedule_on_skip):
    probe = StepLR()
    guard = ExplosionGuard(on_nonfinite="skip", schedule_on_skip=schedule_on_skip)
    faults = Faults(loss=dict.fromkeys((3, 4, 9), "nan"))
    make = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))  # noqa: E731
    trainer = tiny_trainer(tmp_path, max_steps=12, callbacks=[faults, guard, probe])
    trainer.fit(Scheduled(make))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert guard.skipped == 3 and trainer.global_step == 12, "Lightning counts the skipped steps either way"
    if schedule_on_skip == "advance":
        assert scheduler.last_epoch == 12
        assert probe.schedule[5] == pytest.approx(0.01 / 6)
    else:  # the skipped steps used no part of the schedule
        assert scheduler.last_epoch == 9
        assert probe.schedule[5] == pytest.approx(probe.schedule[3]) == pytest.approx(0.01 / 4)
        assert probe.schedule[10] == pytest.approx(0.01 / 8)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------------------------


def _fp16_plugin(init_scale=2.0**16):
    # Lightning's MixedPrecision runs fp16 autocast with a real GradScaler on the CPU when given one
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_a_stream_of_nan_losses_under_16_mixed_counts_as_skips(tmp_path):
    """A NaN loss is not an fp16 overflow: each one counts, and ``max_consecutive_skips=5`` stops the run at the
    fifth, long before the loss scale collapses."""
    guard = ExplosionGuard(on_nonfinite="skip", max_consecutive_skips=5)
    faults = Faults(loss=dict.fromkeys(range(3, 40), "nan"))
    trainer = tiny_trainer(
        tmp_path, max_steps=40, plugins=[_fp16_plugin()], callbacks=[faults, guard], logger=logger(tmp_path)
    )
    with pytest.raises(GradientExplosionError, match=r"5 steps in a row were skipped"):
        trainer.fit(TinyMLP())
    assert trainer.global_step == 7 and guard.skipped == 5
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**10, "the scale had not collapsed yet"
    events = read_jsonl(guard.events_path)
    assert [(e.step, e.kind) for e in events if e.kind == "nonfinite"] == [(s, "nonfinite") for s in range(3, 8)]


@pytest.mark.parametrize("on_nonfinite", ["log", "skip"])
def test_a_collapsing_loss_scale_is_its_own_event(tmp_path, on_nonfinite):
    """A scale so large that every step overflows: the scaler skips each one (no ``nonfinite`` event); after
    ``max_consecutive_skips`` of them in a row a ``scale_collapse`` event is recorded once, and with any response
    but ``"log"`` the run stops with a message that says what happened."""
    guard = ExplosionGuard(on_nonfinite=on_nonfinite, max_consecutive_skips=6)
    trainer = tiny_trainer(
        tmp_path, max_steps=12, plugins=[_fp16_plugin(init_scale=2.0**100)], callbacks=[guard], logger=logger(tmp_path)
    )
    if on_nonfinite == "skip":
        with pytest.raises(GradientExplosionError, match="AMP loss scale collapsed") as info:
            trainer.fit(TinyMLP())
        assert info.value.event.kind == "scale_collapse" and "bf16-mixed" in str(info.value)
    else:
        trainer.fit(TinyMLP())
    events = read_jsonl(guard.events_path)
    assert [e.step for e in events if e.kind == "scale_collapse"] == [5]
    assert all(e.action == "scaler_skipped" for e in events if e.kind == "overflow")
    assert not any(e.kind == "nonfinite" for e in events)


# ---------------------------------------------------------------------------------------------------------------
# skipping without a host read
# ---------------------------------------------------------------------------------------------------------------


class FusedAdamW(TinyMLP):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1, fused=True)


class StateAt(Callback):
    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = _tensors(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = _tensors(pl_module, trainer.optimizers[0])


def _tensors(module, optimizer):
    out = {f"param/{n}": p.detach().clone() for n, p in module.named_parameters()}
    for i, state in optimizer.state_dict()["state"].items():
        out.update({f"state/{i}/{k}": torch.as_tensor(v).clone() for k, v in state.items()})
    return out


def test_skip_with_a_fused_optimizer_reads_nothing_on_the_host(tmp_path):
    """Fused AdamW takes GradScaler's device flag: the NaN step and the spike are skipped with parameters, moments
    and step counts bitwise intact, and no step reads anything on the host; the skips are counted at the flush."""
    around = StateAt(5)
    guard = counting(ExplosionGuard)(on_nonfinite="skip", on_spike="skip", window=16, warmup=4, flush_interval=4)
    faults = Faults(loss={5: "nan"}, grads={9: 1000.0}, layer=LAYER)
    trainer = tiny_trainer(tmp_path, max_steps=12, callbacks=[faults, guard, around], logger=logger(tmp_path))
    model = FusedAdamW()
    trainer.fit(model)
    assert guard.syncs["step"] == [0] * 12 and guard.syncs["backward"] == [0] * 12
    for key, value in around.before.items():
        assert torch.equal(value, around.after[key]), key
    assert guard.skipped == 2
    events = read_jsonl(guard.events_path)
    assert [(e.step, e.kind, e.action) for e in events] == [(5, "nonfinite", "skipped"), (9, "spike", "skipped")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skips_counted_on_the_device_still_stop_a_run(tmp_path):
    guard = ExplosionGuard(on_nonfinite="skip", max_consecutive_skips=3, flush_interval=2)
    faults = Faults(loss=dict.fromkeys(range(4, 30), "nan"))
    trainer = tiny_trainer(tmp_path, max_steps=30, callbacks=[faults, guard], logger=logger(tmp_path))
    model = FusedAdamW()
    with pytest.raises(GradientExplosionError, match=r"3 steps in a row were skipped"):
        trainer.fit(model)
    # the skips are read at the flush: the limit is reached at the flush after step 6, step 7 was skipped as well
    assert guard.skipped == 4 and trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# several optimizers
# ---------------------------------------------------------------------------------------------------------------


class UnevenGAN(TinyMLP):
    """Manual optimization: a "generator" loss about 100 times the "discriminator" loss, one optimizer each."""

    def __init__(self):
        super().__init__(num_samples=400)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_d, opt_g = self.optimizers()
        for opt, scale in ((opt_d, 1.0), (opt_g, 100.0)):
            loss = scale * nn.functional.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        layers = list(self.net.children())
        body = [p for layer in layers[:-2] for p in layer.parameters()]
        head = [p for layer in layers[-2:] for p in layer.parameters()]
        return torch.optim.SGD(body, lr=1e-3), torch.optim.SGD(head, lr=1e-5)


def test_each_optimizer_has_its_own_loss_statistics(tmp_path):
    guard = ExplosionGuard(on_spike="skip", window=16, warmup=4)
    trainer = tiny_trainer(tmp_path, max_steps=80, callbacks=[guard], logger=logger(tmp_path))
    trainer.fit(UnevenGAN())
    assert guard.skipped == 0, "no healthy update of either optimizer is taken for a loss spike"


# ---------------------------------------------------------------------------------------------------------------
# where events go, resuming with other window sizes, Lightning flavours
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", [{"logger": False}, {"fast_dev_run": 12}])
def test_without_a_logger_directory_no_events_file_is_written(tmp_path, monkeypatch, setting):
    monkeypatch.chdir(tmp_path)
    guard = ExplosionGuard(on_nonfinite="skip")
    kwargs = {"max_steps": 12, "default_root_dir": str(tmp_path), **setting}
    trainer = tiny_trainer(tmp_path, callbacks=[Faults(loss={3: "nan"}), guard], **kwargs)
    trainer.fit(TinyMLP())
    assert guard.skipped == 1 and guard.events_path is None
    assert not list(tmp_path.rglob("gradguard_events.jsonl"))


@pytest.mark.parametrize(
    ("saved", "resumed", "argument"),
    [
        (
            GradientClipping("quantile", history_length=20),
            GradientClipping("quantile", history_length=8),
            "history_length",
        ),
        (GradientClipping("zscore", warmup_steps=10), GradientClipping("zscore", warmup_steps=4), "warmup_steps"),
        (ExplosionGuard(window=32), ExplosionGuard(window=16, warmup=8), "window"),
    ],
    ids=["history_length", "warmup_steps", "window"],
)
def test_resuming_with_another_window_size_adapts_and_says_so(tmp_path, saved, resumed, argument):
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=24, save_top_k=-1)
    tiny_trainer(tmp_path, max_steps=24, callbacks=[saved, checkpoint], enable_checkpointing=True).fit(TinyMLP())
    trainer = tiny_trainer(tmp_path, max_steps=30, callbacks=[resumed])
    with pytest.warns(UserWarning, match=rf"`{argument}` was \d+ in the checkpoint and is \d+ now"):
        trainer.fit(TinyMLP(), ckpt_path=next(ckpt_dir.glob("*.ckpt")))
    assert trainer.global_step == 30


def test_every_callback_works_the_same_under_pytorch_lightning(tmp_path):
    """The standalone ``pytorch_lightning`` package: its TensorBoard logger gets the dashboard and histograms, and
    its single-device strategy passes without a warning."""
    import warnings

    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_gradguard import GradientNormMonitor, GradientQuantization
    from tests.helpers.tb import load_events, read_layout, read_scalars

    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [
        GradientNormMonitor(layer_interval=2, histogram_interval=4),
        ExplosionGuard(),
        GradientClipping("norm", max_norm=1.0),
        GradientQuantization(),
    ]
    trainer = pl.Trainer(
        max_steps=8,
        logger=tb,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        log_every_n_steps=4,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not been tested with.*")
        trainer.fit(BoringModel())
    assert "gradient norm" in read_layout(tb.log_dir)["gradguard"]
    assert load_events(tb.log_dir).Tags()["histograms"]
    assert sorted(read_scalars(tb.log_dir)["gradguard/grad_norm"]) == list(range(8))


def test_functional_imports_without_lightning():
    code = (
        "import sys, lightning_gradguard.functional;"
        " print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
