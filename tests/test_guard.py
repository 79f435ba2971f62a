"""ExplosionGuard in real Trainer.fit runs: detection, responses, reports read back from JSONL and TensorBoard files."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradguard.callbacks.guard import ExplosionGuard, GradientExplosionError
from lightning_gradguard.events import read_jsonl
from tests.helpers.faults import Faults
from tests.helpers.models import TinyMLP, tiny_trainer
from tests.helpers.reads import NormReadCounter
from tests.helpers.sync import counting
from tests.helpers.tb import load_events, read_layout, read_scalars

SPIKE_LAYER = "net.2.weight"


def faults(nan_steps=(), spike_steps=(), loss_offset_steps=()) -> Faults:
    """NaN losses (so NaN gradients), 1000x gradients of ``net.2.weight``, and +50 on the loss (a loss spike that
    leaves the gradients alone) at the given steps. Listed before the guard."""
    loss = {**dict.fromkeys(nan_steps, "nan"), **dict.fromkeys(loss_offset_steps, 50.0)}
    return Faults(loss=loss, grads=dict.fromkeys(spike_steps, 1000.0), layer=SPIKE_LAYER)


def logger(tmp_path, name="logs"):
    """A CSV logger: the events file goes to its directory."""
    return CSVLogger(tmp_path, name=name, version=0)


class RepairAfterGuard(Callback):
    """Drops the gradients of the given steps after the guard has looked at them (placed after the guard), so that
    a log-only run meets each injected fault on a healthy model."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            for p in pl_module.parameters():
                p.grad = None


def dataset_loss(model: TinyMLP) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(model.x), model.y).item()


def tensors_of(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and every tensor of the optimizer state, copied."""
    out = {f"param/{n}": p.detach().clone() for n, p in module.named_parameters()}
    for i, state in optimizer.state_dict()["state"].items():
        out.update({f"state/{i}/{k}": torch.as_tensor(v).clone() for k, v in state.items()})
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_nonfinite": "ignore"}, ValueError, r"`on_nonfinite` to be one of .* but got 'ignore'"),
        ({"on_spike": "clip"}, ValueError, r"`on_spike` to be one of .* but got 'clip'"),
        ({"statistic": "mode"}, ValueError, r"`statistic` to be one of .* but got 'mode'"),
        ({"threshold": 0}, ValueError, r"`threshold` to be a positive finite number but got 0"),
        ({"threshold": math.nan}, ValueError, r"`threshold` to be a positive finite number but got nan"),
        ({"max_norm": -1.0}, ValueError, r"`max_norm` to be a positive finite number but got -1.0"),
        ({"window": 0}, ValueError, r"`window` to be a positive integer but got 0"),
        ({"window": 8, "warmup": 9}, ValueError, r"`warmup` to be at most `window` \(8\) but got 9"),
        ({"top_k": 2.5}, ValueError, r"`top_k` to be a positive integer but got 2.5"),
        ({"on_spike": "rewind", "lr_factor": 1.5}, ValueError, r"`lr_factor` to be a number in \(0, 1\] but got 1.5"),
        ({"on_spike": "rewind", "lr_factor": 0}, ValueError, r"`lr_factor` to be a number in \(0, 1\] but got 0"),
        ({"on_spike": "rewind", "snapshot_device": "gpu"}, ValueError, r"`snapshot_device` to be 'cpu' or 'same'"),
        ({"schedule_on_skip": "freeze"}, ValueError, r"`schedule_on_skip` to be 'advance' or 'hold' but got 'freeze'"),
        # rewind options on a guard that never rewinds are errors, not ignored
        ({"lr_factor": 0.5}, ValueError, r"`lr_factor` applies to the 'rewind' response only but got lr_factor=0.5"),
        ({"on_spike": "skip", "snapshot_interval": 10}, ValueError, r"`snapshot_interval` applies to the 'rewind'"),
        ({"on_nonfinite": "raise", "max_rewinds": 2}, ValueError, r"`max_rewinds` applies to the 'rewind' response"),
        ({"detect_loss": "yes"}, TypeError, r"`detect_loss` to be a bool but got str"),
        (
            {"on_spike": "rewind", "rewind_patience": 4, "max_consecutive_skips": 2},
            ValueError,
            r"`max_consecutive_skips` to be at least `rewind_patience` \(4\)",
        ),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExplosionGuard(**kwargs)


def test_log_mode_is_sync_free_and_reports_every_event_with_its_layer(tmp_path, caplog):
    guard = counting(ExplosionGuard)(
        on_nonfinite="log", on_spike="log", window=16, warmup=5, max_norm=100.0, flush_interval=4
    )
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = TinyMLP()
    injected = faults(nan_steps={6}, spike_steps={10}, loss_offset_steps={14})
    # the summary is an INFO record of Lightning's rank-zero logger; another test may have raised that level
    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(caplog.handler)
    try:
        tiny_trainer(tmp_path, max_steps=18, callbacks=[injected, guard, RepairAfterGuard({6, 10})], logger=tb).fit(
            model
        )
    finally:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").removeHandler(caplog.handler)

    # no host read on the hot path, in the pipeline nor in the loss hook
    assert guard.syncs["step"] == [0] * 18
    assert guard.syncs["backward"] == [0] * 18

    events = read_jsonl(guard.events_path)
    assert guard.events_path == tmp_path / "tb" / "version_0" / "gradguard_events.jsonl"
    expected = [(6, "nonfinite"), (10, "spike"), (10, "threshold"), (14, "loss_spike")]
    assert [(e.step, e.kind) for e in events] == expected
    assert all(e.action == "logged" and e.epoch == 0 and e.rank == 0 for e in events)
    assert len({e.run_id for e in events}) == 1 and all(e.attempt == 1 for e in events)
    nonfinite, spike, threshold, loss_spike = events
    assert math.isnan(nonfinite.grad_norm) and math.isnan(nonfinite.loss)
    # the layer whose gradient was blown up is named first; its norm dominates the global norm
    assert spike.top_layers[0][0] == SPIKE_LAYER
    assert len(spike.top_layers) == 5
    assert spike.grad_norm > 100 and spike.zscore > 6 and 0 < spike.baseline < spike.grad_norm / 50
    assert spike.top_layers[0][1] == pytest.approx(spike.grad_norm, rel=1e-3)
    assert threshold.grad_norm == spike.grad_norm
    # the loss spike is measured against the loss baseline, and the gradients were left alone
    assert loss_spike.loss > 50 and loss_spike.baseline < 5 and loss_spike.grad_norm < 100

    # TensorBoard: running counts, one markdown report per event, the "events" chart
    scalars = read_scalars(tb.log_dir)
    assert scalars["gradguard/events/nonfinite"] == {6: 1.0}
    assert scalars["gradguard/events/spike"] == {10: 1.0}
    assert scalars["gradguard/events/loss_spike"] == {14: 1.0}
    assert "gradguard/guard/skipped" not in scalars
    texts = load_events(tb.log_dir).Tensors("gradguard/events/text_summary")
    assert [t.step for t in texts] == [6, 10, 10, 14]
    report = texts[1].tensor_proto.string_val[0].decode()
    assert "**spike** at step 10" in report and f"| 1 | {SPIKE_LAYER} |" in report
    assert read_layout(tb.log_dir)["gradguard"]["events"] == [r"gradguard/events/.*", r"gradguard/guard/.*"]
    assert guard.event_counts == {
        "nonfinite": 1,
        "spike": 1,
        "loss_spike": 1,
        "threshold": 1,
        "overflow": 0,
        "scale_collapse": 0,
        "persistent_clipping": 0,
    }

    # the end-of-fit summary on rank 0
    summary = next(r.getMessage() for r in caplog.records if "ExplosionGuard summary" in r.getMessage())
    assert "nonfinite" in summary and "loss_spike" in summary and "skipped steps: 0, rewinds: 0" in summary


class StateAroundStep(Callback):
    """Copies parameters and optimizer state before and after one optimizer step."""

    def __init__(self, step: int):
        self.step = step
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = tensors_of(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = tensors_of(pl_module, trainer.optimizers[0])


class OptimizerChoice(TinyMLP):
    def __init__(self, optimizer_name: str, fused: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.optimizer_name, self.fused = optimizer_name, fused

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2, fused=self.fused)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1, fused=self.fused)
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3, fused=self.fused)


# the responses that act on the model, also on a GPU (scripts/gpu_check.sh runs the "cuda" cases)
ACCELERATORS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adam", "adamw"])
def test_skip_leaves_parameters_and_optimizer_state_bitwise_unchanged(tmp_path, optimizer_name, accelerator):
    nan_step = 5
    around = StateAroundStep(nan_step)
    guard = counting(ExplosionGuard)(on_nonfinite="skip", window=16, warmup=4)
    model = OptimizerChoice(optimizer_name)
    callbacks = [faults(nan_steps={nan_step}), guard, around]
    tiny_trainer(tmp_path, max_steps=10, callbacks=callbacks, accelerator=accelerator, logger=logger(tmp_path)).fit(
        model
    )

    assert_bitwise_equal(around.before, around.after)  # no parameter, moment, step count or decay changed
    assert guard.skipped == 1 and guard.consecutive_skips == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the step before and the steps after did change the model: training went on
    assert not torch.equal(around.after[f"param/{SPIKE_LAYER}"].cpu(), model.net[2].weight.detach().cpu())
    # the opt-in decision costs exactly one host read per step (foreach/for-loop optimizers), and nothing else does
    assert guard.syncs["step"] == [1] * 10
    assert guard.syncs["backward"] == [0] * 10
    (event,) = read_jsonl(guard.events_path)
    assert (event.step, event.kind, event.action) == (nan_step, "nonfinite", "skipped")


@pytest.mark.parametrize(("fault", "kind"), [({"nan_steps": {7}}, "nonfinite"), ({"spike_steps": {7}}, "spike")])
def test_raise_stops_fit_with_a_report_naming_step_norm_and_layers(tmp_path, fault, kind):
    guard = ExplosionGuard(on_nonfinite="raise", on_spike="raise", window=16, warmup=4, detect_loss=False)
    with pytest.raises(GradientExplosionError) as info:
        tiny_trainer(tmp_path, max_steps=12, callbacks=[faults(**fault), guard], logger=logger(tmp_path)).fit(TinyMLP())
    error = info.value
    assert error.event.step == 7 and error.event.kind == kind and error.event.action == "raised"
    message = str(error)
    assert "step 7" in message and "What to try next" in message
    assert f"gradient norm {error.event.grad_norm:.4g}" in message
    assert error.event.top_layers[0][0] in message
    if kind == "spike":
        assert error.event.top_layers[0][0] == SPIKE_LAYER
        assert "on_spike='raise'" in message and "GradientClipping" in message
    else:
        assert "gradient norm nan" in message and "on_nonfinite='raise'" in message
    assert f"| 1 | {error.event.top_layers[0][0]} |" in error.report
    # the event was written before the raise
    written = read_jsonl(guard.events_path)
    assert [(e.step, e.kind, e.action) for e in written] == [(7, kind, "raised")]


def test_too_many_consecutive_skips_raise(tmp_path):
    guard = ExplosionGuard(on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.raises(GradientExplosionError, match=r"3 steps in a row were skipped \(max_consecutive_skips=3\)"):
        tiny_trainer(
            tmp_path, max_steps=20, callbacks=[faults(nan_steps=range(4, 20)), guard], logger=logger(tmp_path)
        ).fit(TinyMLP())
    assert guard.skipped == 3
    actions = [(e.step, e.action) for e in read_jsonl(guard.events_path)]
    assert actions == [(4, "skipped"), (5, "skipped"), (6, "raised")]


class LRJump(Callback):
    """Multiplies the learning rate once, at the start of optimizer step ``step`` (a divergence trigger)."""

    def __init__(self, step: int, factor: float):
        self.step, self.factor, self.done = step, factor, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor


class StepLR(Callback):
    """The learning rate each optimizer step is taken with (read inside the step, after the guard's factor)."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, *args):
            self.lrs[trainer.global_step] = float(optimizer.param_groups[0]["lr"])

        trainer.optimizers[0].register_step_pre_hook(record)


def test_lr_jump_divergence_rewind_recovers_and_log_shows_where_it_started(tmp_path):
    jump, kwargs = 17, dict(window=16, warmup=8, flush_interval=10)

    diverged = TinyMLP()
    log_guard = ExplosionGuard(on_nonfinite="log", on_spike="log", **kwargs)
    log_tb = TensorBoardLogger(tmp_path, name="log", version=0)
    tiny_trainer(tmp_path, max_steps=60, callbacks=[log_guard, LRJump(jump, 40.0)], logger=log_tb).fit(diverged)
    assert not math.isfinite(dataset_loss(diverged))
    log_events = read_jsonl(log_guard.events_path)
    # when: the first event is the step after the jump (the jumped update made the next gradients explode)
    first = log_events[0]
    assert (first.step, first.kind) == (jump + 1, "spike") and first.zscore > 6
    # where: the report names real layers, largest first; later the run turns non-finite
    names = dict(diverged.named_parameters())
    assert all(name in names for name, _ in first.top_layers)
    assert [n for _, n in first.top_layers] == sorted((n for _, n in first.top_layers), reverse=True)
    assert any(e.kind == "nonfinite" for e in log_events)

    recovered = TinyMLP()
    snapshot_step = 15  # the last multiple of snapshot_interval before the jump
    around = StateAroundStep(snapshot_step)
    guard = ExplosionGuard(
        on_nonfinite="rewind", on_spike="rewind", snapshot_interval=5, rewind_patience=2, lr_factor=0.5, **kwargs
    )
    rewind_tb = TensorBoardLogger(tmp_path, name="rewind", version=0)
    probe = StepLR()
    rewind_trainer = tiny_trainer(
        tmp_path, max_steps=60, callbacks=[guard, LRJump(jump, 40.0), around, probe], logger=rewind_tb
    )
    rewind_trainer.fit(recovered)
    final_loss = dataset_loss(recovered)
    assert math.isfinite(final_loss) and final_loss < dataset_loss(TinyMLP())  # finite, and it learned
    assert guard.rewinds == 1 and guard.skipped == 2
    actions = [(e.step, e.action) for e in read_jsonl(guard.events_path) if e.kind == "spike"]
    assert actions == [(jump + 1, "skipped"), (jump + 2, "rewound")]
    scalars = read_scalars(rewind_tb.log_dir)
    assert scalars["gradguard/guard/rewinds"] == {jump + 2: 1.0}
    assert scalars["gradguard/guard/skipped"] == {jump + 1: 1.0, jump + 2: 2.0}
    # the learning rate went back to the snapshot's (before the jump); the optimizer steps with half of it
    assert rewind_trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert guard.lr_scale == 0.5
    assert probe.lrs[jump - 1] == pytest.approx(0.05) and probe.lrs[jump + 3] == pytest.approx(0.025)
    # snapshots: healthy steps at multiples of 5, copied to the CPU; its size is the model plus momentum buffers
    n_params = sum(p.numel() for p in recovered.parameters())
    assert guard.snapshot.nbytes == 2 * 4 * n_params
    capture_ms = guard.snapshot.seconds * 1e3
    print(f"\nsnapshot of {n_params} params + SGD momentum: {guard.snapshot.nbytes} B in {capture_ms:.3f} ms")

    # the guard's bookkeeping survives a state_dict round trip
    state = guard.state_dict()
    restored = ExplosionGuard(window=16, warmup=8)
    restored.load_state_dict(copy.deepcopy(state))
    assert_state_equal(restored.state_dict(), state)
    assert (restored.rewinds, restored.lr_scale, restored.next_snapshot_step) == (1, 0.5, 60)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_state_equal(value, b[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(torch.nan_to_num(value, nan=-1.0), torch.nan_to_num(b[key], nan=-1.0)), key
        else:
            assert value == b[key], key


class RecordingRestore(Callback):
    """Parameters at the start of every step and at the end of every step."""

    def __init__(self):
        self.start, self.end = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start[trainer.global_step] = tensors_of(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end[trainer.global_step - 1] = tensors_of(pl_module, trainer.optimizers[0])


class JumpingSchedule(TinyMLP):
    """Adam with a learning-rate schedule that jumps 100-fold at step 12 and stays there."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if s < 12 else 100.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("snapshot_device", ["cpu", "same"])
def test_rewind_restores_the_snapshot_exactly_and_gives_up_after_max_rewinds(tmp_path, snapshot_device, accelerator):
    recorder = RecordingRestore()
    guard = ExplosionGuard(
        on_spike="rewind",
        window=16,
        warmup=6,
        snapshot_interval=4,
        rewind_patience=1,
        max_rewinds=2,
        lr_factor=0.5,
        snapshot_device=snapshot_device,
    )
    trainer = tiny_trainer(
        tmp_path, max_steps=40, callbacks=[guard, recorder], accelerator=accelerator, logger=logger(tmp_path)
    )
    with pytest.raises(GradientExplosionError, match=r"2 rewinds did not help \(max_rewinds=2\)"):
        trainer.fit(JumpingSchedule())
    assert guard.rewinds == 2
    rewinds = sorted({e.step for e in read_jsonl(guard.events_path) if e.action == "rewound"})
    assert rewinds == [13, 15]
    # the snapshot of step 12 (healthy: the jumped rate has not acted yet) is restored twice; parameters and Adam
    # state are then bitwise those of that step
    for step in rewinds:
        assert_bitwise_equal(recorder.end[step], recorder.start[12])
    # the schedule itself is left to its scheduler; the rewinds' factor (halved twice) applies inside each step,
    # still 25-fold too high, so the run explodes again and the guard gives up
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(1e-2)]
    assert guard.lr_scale == 0.25


def test_resumed_run_makes_the_same_decisions_as_an_uninterrupted_run(tmp_path):
    def run(max_steps, root, ckpt_path=None):
        guard = ExplosionGuard(
            on_nonfinite="skip",
            on_spike="rewind",
            window=16,
            warmup=8,
            snapshot_interval=4,
            rewind_patience=1,
            lr_factor=0.5,
        )
        model = TinyMLP(num_samples=80)  # 10 batches per epoch
        checkpoint = ModelCheckpoint(dirpath=tmp_path / root / "ckpt", every_n_train_steps=10, save_top_k=-1)
        callbacks = [faults(nan_steps={3}, spike_steps={13}), guard, checkpoint]
        tiny_trainer(
            tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True, logger=logger(tmp_path, root)
        ).fit(model, ckpt_path=ckpt_path)
        return guard, model

    full_guard, full_model = run(20, "full")
    run(10, "part")
    resumed_guard, resumed_model = run(20, "part", ckpt_path=tmp_path / "part" / "ckpt" / "epoch=0-step=10.ckpt")

    # the spike at step 13 is only detectable with the 10 norms recorded before the checkpoint (warmup=8); the
    # rewind it triggers goes back to step 12 in both runs (the resumed run took a snapshot at its first step, 10,
    # and the next one on the uninterrupted schedule, at 12)
    assert full_guard.skipped == resumed_guard.skipped == 2
    assert full_guard.rewinds == resumed_guard.rewinds == 1
    assert full_guard.snapshot.step == resumed_guard.snapshot.step == 16
    assert_state_equal(resumed_guard.state_dict(), full_guard.state_dict())
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    full, part = read_jsonl(full_guard.events_path), read_jsonl(resumed_guard.events_path)
    assert [(e.step, e.kind, e.action) for e in part] == [(e.step, e.kind, e.action) for e in full]
    assert [(e.step, e.kind, e.action) for e in full] == [(3, "nonfinite", "skipped"), (13, "spike", "rewound")]
    # one run in one directory: the resumed fit is its second attempt
    assert [e.attempt for e in part] == [1, 2] and part[0].run_id == part[1].run_id != full[0].run_id


def test_load_state_dict_accepts_an_empty_state():
    guard = ExplosionGuard()
    guard.load_state_dict({})
    assert guard.skipped == guard.rewinds == 0 and guard.lr_scale == 1.0
    assert guard.event_counts == dict.fromkeys(guard.event_counts, 0)


class ScalerRecorder(Callback):
    def __init__(self):
        self.found_inf: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = trainer.precision_plugin.scaler
        state = scaler._per_optimizer_states[id(optimizer)]
        self.found_inf[trainer.global_step] = bool(sum(v.item() for v in state["found_inf_per_device"].values()))


def check_overflow_is_reported_not_skipped(guard: ExplosionGuard, recorder: ScalerRecorder, events_path) -> None:
    overflow_steps = sorted(s for s, found in recorder.found_inf.items() if found)
    assert overflow_steps, "the scale must have overflowed at least once"
    events = read_jsonl(events_path)
    assert sorted(e.step for e in events if e.kind == "overflow") == overflow_steps
    assert all(e.action == "scaler_skipped" for e in events if e.step in overflow_steps)
    assert not any(e.kind == "nonfinite" for e in events), "a scaler overflow is not an explosion"
    assert guard.skipped == 0, "the scaler skipped these steps already"


def test_amp_overflow_on_cpu_is_reported_as_overflow_and_not_skipped_twice(tmp_path):
    # Lightning turns precision="16-mixed" into bf16 on the CPU, but its MixedPrecision plugin runs fp16 autocast
    # with a real GradScaler there when given one; a huge initial scale makes the first steps overflow
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**20))
    guard, recorder = ExplosionGuard(on_nonfinite="skip", on_spike="skip", window=16, warmup=4), ScalerRecorder()
    model = TinyMLP()
    tiny_trainer(tmp_path, max_steps=16, plugins=[plugin], callbacks=[guard, recorder], logger=logger(tmp_path)).fit(
        model
    )
    check_overflow_is_reported_not_skipped(guard, recorder, guard.events_path)
    assert not all(recorder.found_inf.values()), "the scale must have come down and training resumed"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="precision='16-mixed' with a GradScaler needs CUDA")
def test_amp_overflow_on_cuda_is_reported_as_overflow_and_not_skipped_twice(tmp_path):
    guard, recorder = ExplosionGuard(on_nonfinite="skip", on_spike="skip", window=16, warmup=4), ScalerRecorder()
    callbacks = [guard, recorder]
    trainer = tiny_trainer(
        tmp_path, accelerator="cuda", precision="16-mixed", max_steps=16, callbacks=callbacks, logger=logger(tmp_path)
    )
    trainer.precision_plugin.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**20)
    trainer.fit(TinyMLP())
    check_overflow_is_reported_not_skipped(guard, recorder, guard.events_path)


def test_with_gradient_clipping_the_guard_sees_the_pre_clip_norm_from_the_one_norm_computation(tmp_path):
    from lightning_gradguard.callbacks.clipping import GradientClipping

    reads = []

    class ReadCountingClipping(GradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            with NormReadCounter(grads, []) as counter:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            reads.append(counter.reads["grad"] / max(len(grads), 1))

    clipping = ReadCountingClipping("norm", max_norm=1.0)
    guard = ExplosionGuard(on_nonfinite="skip", on_spike="log", window=16, warmup=4, flush_interval=5)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = TinyMLP()
    # clipping listed first: the pipeline still runs the guard (stage 10) before clipping (stage 20)
    callbacks = [faults(nan_steps={5}, spike_steps={8}), clipping, guard]
    tiny_trainer(tmp_path, max_steps=12, callbacks=callbacks, logger=tb).fit(model)

    assert reads == [1.0] * 12, "every gradient is read once per step for norms, shared by guard and clipping"
    scalars = read_scalars(tb.log_dir)
    nonfinite, spike = read_jsonl(guard.events_path)
    assert (spike.step, spike.kind) == (8, "spike") and spike.top_layers[0][0] == SPIKE_LAYER
    # the guard saw the norm before clipping, the very value the clipping logged as its input
    assert spike.grad_norm > 100
    assert spike.grad_norm == pytest.approx(scalars["gradguard/grad_norm"][8], rel=1e-6)
    assert scalars["gradguard/grad_norm_clipped"][8] == pytest.approx(1.0, rel=1e-4)
    # the skipped NaN step never reached the clipping stage
    assert (nonfinite.step, nonfinite.action) == (5, "skipped")
    assert 5 not in scalars["gradguard/clip_coef"] and 4 in scalars["gradguard/clip_coef"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
