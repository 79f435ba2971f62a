"""GradientQuantization in real Trainer.fit runs: logging, host syncs, the gradients the optimizer sees, resume,
and training outcomes."""

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks.quant_outcomes import TOLERANCE, train
from lightning_gradguard.callbacks.quantization import GradientQuantization
from tests.helpers.models import TinyMLP, tiny_trainer
from tests.helpers.tb import read_layout, read_scalars
from tests.workers.quant_common import RecordingQuantization


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (runs get ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FirstUpdate(Callback):
    """Parameters before and after the first optimizer step, read outside the gradguard pipeline."""

    def on_train_start(self, trainer, pl_module):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 1:
            self.after = [p.detach().clone() for p in pl_module.parameters()]


def test_fit_logs_every_step_without_host_syncs_and_optimizer_sees_quantized_grads(tmp_path, one_thread):
    steps = 7
    quantization = RecordingQuantization(
        record_steps=1, method="stochastic", bits=4, block_size=32, clamp_sigma=2.0, flush_interval=3
    )
    first = FirstUpdate()
    logger = TensorBoardLogger(str(tmp_path), name="logs", version=0)
    model = TinyMLP(lr=0.05, optimizer="sgd")
    tiny_trainer(tmp_path, max_steps=steps, callbacks=[quantization, first], logger=logger).fit(model)

    assert quantization.syncs == [0] * steps
    logged = read_scalars(tmp_path / "logs" / "version_0")
    rel_error, clamped = logged["gradguard/quant/rel_error"], logged["gradguard/quant/clamped"]
    assert sorted(rel_error) == sorted(clamped) == list(range(steps))
    assert all(0.01 < v < 0.5 for v in rel_error.values())  # 4-bit: a few percent to tens of percent
    assert all(0 < v < 0.2 for v in clamped.values())  # 2 sigma clamps a few percent of Gaussian-like elements
    layout = read_layout(tmp_path / "logs" / "version_0")
    assert any("quant/" in tag for tag in layout["gradguard"]["quantization"])

    # the optimizer stepped with the quantized gradients: SGD's first update is -lr * (quantized grad)
    record = quantization.records[0]
    assert not all(torch.equal(b, a) for b, a in zip(record["before"], record["after"]))
    for p0, p1, g in zip(first.before, first.after, record["after"]):
        torch.testing.assert_close(p1, p0 - 0.05 * g)


def _resume_run(tmp_path, max_steps, ckpt_path=None, load_state=True):
    """TinyMLP with one batch per epoch (every step sees the same data, whatever Lightning does with the
    dataloader on resume), SGD with momentum, stochastic rounding with error feedback and a sampled quantile bound."""
    quantization = GradientQuantization("stochastic", bits=3, block_size=64, error_feedback=True, clamp_quantile=0.95)
    if not load_state:
        quantization.load_state_dict = lambda state: None
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    model = TinyMLP(num_samples=16, batch_size=16, lr=0.05, optimizer="sgd")
    trainer = tiny_trainer(
        tmp_path, max_steps=max_steps, callbacks=[quantization, checkpoint], enable_checkpointing=True
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, quantization


def test_resumed_run_reproduces_uninterrupted_run_bitwise(tmp_path, one_thread):
    model, quantization = _resume_run(tmp_path / "full", max_steps=6)
    (ckpt,) = (tmp_path / "full" / "ckpt").glob("*step=3.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"][quantization.state_key]
    assert set(saved["residuals"][0]) == {n for n, _ in model.named_parameters()}

    resumed, resumed_quantization = _resume_run(tmp_path / "resumed", max_steps=6, ckpt_path=str(ckpt))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    final, resumed_final = quantization.quantizer.residuals(), resumed_quantization.quantizer.residuals()
    assert all(torch.equal(final[n], resumed_final[n]) for n in final)

    # control: without the callback's state (residuals) the resumed run ends elsewhere
    lost, _ = _resume_run(tmp_path / "lost", max_steps=6, ckpt_path=str(ckpt), load_state=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), lost.parameters()))


def test_state_dict_round_trip():
    quantization = GradientQuantization("sign", seed=5)
    grads = [torch.randn(10), torch.randn(3, 3)]
    quantization.quantizer.quantize_([g.clone() for g in grads], step=0, names=["a", "b"])
    state = copy.deepcopy(quantization.state_dict())
    restored = GradientQuantization("sign")
    restored.load_state_dict(state)
    assert restored.quantizer.seed == 5
    assert restored.state_dict()["residuals"][0].keys() == {"a", "b"}
    assert all(torch.equal(restored.state_dict()["residuals"][0][n], state["residuals"][0][n]) for n in "ab")
    assert restored.state_key == quantization.state_key != GradientQuantization("stochastic").state_key


def test_trainer_gradient_clip_val_warns(tmp_path, one_thread):
    trainer = tiny_trainer(tmp_path, max_steps=1, gradient_clip_val=1.0, callbacks=[GradientQuantization()])
    with pytest.warns(UserWarning, match="clips after the gradients were quantized"):
        trainer.fit(TinyMLP())


def test_two_quantization_callbacks_rejected(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[GradientQuantization(), GradientQuantization("sign")])
    with pytest.raises(ValueError, match="Found 2 GradientQuantization callbacks"):
        trainer.fit(TinyMLP())


def test_bad_argument_raises_in_init():
    with pytest.raises(ValueError, match=r"Expected `bits` to be an integer in \[2, 8\] but got 12"):
        GradientQuantization(bits=12)
    with pytest.raises(ValueError, match="Expected `flush_interval` to be a positive integer or None but got 0"):
        GradientQuantization(flush_interval=0)


def test_training_still_works(tmp_path, one_thread):
    """8-bit stochastic rounding and sign + error feedback end within TOLERANCE of the unquantized held-out loss
    (benchmarks/quant_outcomes.py, smaller: 300 steps, one seed)."""
    steps = 300
    baseline, _ = train(None, steps, seed=0, root=str(tmp_path))
    for config in (dict(method="stochastic", bits=8), dict(method="sign")):
        loss, _ = train(config, steps, seed=0, root=str(tmp_path))
        assert loss <= baseline + TOLERANCE, config
    # the task is learnt at all: the loss of a uniform guess over 10 classes is ln(10) = 2.30
    assert baseline < 1.0


def test_runs_after_clipping(tmp_path, one_thread):
    """Attached before GradientClipping in the callback list, it still quantizes the clipped gradients."""
    from lightning_gradguard.callbacks.clipping import GradientClipping

    quantization = RecordingQuantization(record_steps=3, rounding="nearest")
    clipping = GradientClipping("norm", max_norm=1e-3)
    tiny_trainer(tmp_path, max_steps=3, callbacks=[quantization, clipping]).fit(TinyMLP())
    for record in quantization.records:
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in record["before"]])) <= 1e-3 * (1 + 1e-5)


# compress_communication=True: what needs no second process (the 2-process runs: test_quantization_distributed.py)


def _setup(callback, strategy):
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback], loggers=[SimpleNamespace()],
                              log_every_n_steps=50, gradient_clip_val=None)
    callback.setup(trainer, None, "fit")


def test_compression_on_a_single_device_is_an_error_at_setup(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[GradientQuantization(compress_communication=True)])
    with pytest.raises(ValueError, match=r"Expected DDPStrategy .* `compress_communication=True`.* the strategy is"
                                         r" SingleDeviceStrategy"):
        trainer.fit(TinyMLP())


def test_compression_under_fsdp2_is_an_error_at_setup():
    from lightning.pytorch.strategies import ModelParallelStrategy

    with pytest.raises(ValueError, match="Expected DDPStrategy .* the strategy is ModelParallelStrategy. FSDP2"):
        _setup(GradientQuantization(compress_communication=True), ModelParallelStrategy())


def test_compression_with_a_hook_of_ddpstrategy_is_an_error_at_setup():
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    _setup(GradientQuantization(compress_communication=True), DDPStrategy())  # no hook of its own: accepted
    with pytest.raises(ValueError, match=r"DDPStrategy\(ddp_comm_hook=fp16_compress_hook\)` gives another"):
        _setup(GradientQuantization(compress_communication=True), DDPStrategy(ddp_comm_hook=fp16_compress_hook))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rounding="nearest"), ValueError, "`rounding` does not apply with compress_communication=True.*nearest"),
        (dict(rounding="stochastic"), ValueError, "`rounding` does not apply with compress_communication=True"),
        (dict(clamp_sigma=3.0), ValueError, "`clamp_sigma` does not apply with compress_communication=True.*3.0"),
        (dict(clamp_quantile=0.9), ValueError, "`clamp_quantile` does not apply with compress_communication=True"),
        (dict(method="sign", bits=4), ValueError, "`bits` does not apply to method='sign'"),
        (dict(method="qsgd", levels=300), ValueError, r"Expected `levels` to be an integer in \[1, 127\] but got 300"),
        (dict(method="sign", error_feedback=False), ValueError, "always uses error feedback"),
        (dict(block_size=0), ValueError, "Expected `block_size` to be an integer >= 1 but got 0"),
    ],
)
def test_compression_arguments_that_do_not_apply_are_errors_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientQuantization(**kwargs, compress_communication=True)


def test_compression_flag_and_defaults():
    with pytest.raises(TypeError, match="Expected `compress_communication` to be a bool but got str"):
        GradientQuantization(compress_communication="yes")
    # the after-step mode takes every method's own defaults: nothing forwarded counts as given
    assert GradientQuantization("sign").quantizer.levels == GradientQuantization("terngrad").quantizer.levels == 1
    compressed = GradientQuantization("sign", compress_communication=True)
    assert compressed.quantizer is None and compressed.state_key != GradientQuantization("sign").state_key
    assert set(compressed.charts()) == {"quantization", "communication"}
    saved = {"ranks": [{"world_size": 2, "residuals": {}}, {"world_size": 2, "residuals": {}}]}
    compressed.load_state_dict(saved)
    assert compressed.state_dict() == saved  # kept until fit start, where each rank takes its own entry
