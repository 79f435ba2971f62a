"""The example workloads of ``examples/workloads.py`` and the outcome suite's of ``benchmarks/workloads.py``: shapes,
a few real training steps, determinism, arguments.

That the workloads explode without clipping and learn with it is measured by ``benchmarks/outcomes.py`` (hundreds
of steps per run); here each workload trains for a few steps only.
"""

import math

import pytest
import torch
from lightning import Trainer
from torch import nn

from benchmarks.workloads import CONFIRMATION, HOLDOUT, SELECTION, SUITE, Optim, SuiteModule, machine_text
from benchmarks.workloads import build as build_suite_workload
from examples.workloads import (
    VOCAB_SIZE,
    WORKLOADS,
    AddingProblemData,
    CharTransformerLM,
    DeepMLP,
    GaussianBlobsData,
    LongRangeRNN,
    StdlibTextData,
    build_workload,
    evaluate,
    stdlib_text,
)

# shrink the data so that building it costs next to nothing; the models keep their test size
SMALL = {
    "rnn": {"num_train": 256, "num_val": 64},
    "transformer": {"max_chars": 20_000, "num_val": 8},
    "mlp": {"num_train": 512, "num_val": 256},
}

# (input shape, target shape) of one batch at test size
BATCH_SHAPES = {
    "rnn": ((64, 150, 2), (64,)),
    "transformer": ((32, 64), (32, 64)),
    "mlp": ((128, 32), (128,)),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one intra-op thread is as fast, and does not collapse when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_batch(datamodule):
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_trains_a_few_steps(name):
    module, datamodule = build_workload(name, seed=0, **SMALL[name])
    x, y = _first_batch(datamodule)
    assert (tuple(x.shape), tuple(y.shape)) == BATCH_SHAPES[name]
    with torch.no_grad():
        initial = module.compute_loss((x, y))
    assert initial.ndim == 0
    assert torch.isfinite(initial)

    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.1,
    )
    trainer.fit(module, datamodule)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train_loss"])

    result = evaluate(module, datamodule)
    assert set(result) == {"final_loss", "diverged"}
    assert isinstance(result["final_loss"], float)
    assert math.isfinite(result["final_loss"])
    assert result["diverged"] == (result["final_loss"] > module.divergence_threshold)
    assert module.training  # evaluate restores the mode


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_is_deterministic_for_a_seed(name):
    module_a, data_a = build_workload(name, seed=3, **SMALL[name])
    module_b, data_b = build_workload(name, seed=3, **SMALL[name])
    for a, b in zip(_first_batch(data_a), _first_batch(data_b)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(module_a.state_dict().values(), module_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    held_out_a = next(iter(data_a.val_dataloader()))
    held_out_b = next(iter(data_b.val_dataloader()))
    for a, b in zip(held_out_a, held_out_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    _, data_c = build_workload(name, seed=4, **SMALL[name])
    assert not torch.equal(_first_batch(data_a)[0], _first_batch(data_c)[0])


def test_full_size_is_larger():
    for name, (module_cls, _, _, _) in WORKLOADS.items():
        test_module, _ = build_workload(name, "test")
        full_module, full_data = build_workload(name, "full")
        assert isinstance(full_module, module_cls)
        n_test = sum(p.numel() for p in test_module.parameters())
        n_full = sum(p.numel() for p in full_module.parameters())
        assert n_full >= n_test
        if name == "transformer":
            assert full_module.hparams.context == full_data.context == 128


def test_adding_problem_targets():
    data = AddingProblemData(seq_len=10, num_train=32, num_val=8, batch_size=8)
    data.setup()
    x, y = data._train.tensors
    markers = x[..., 1]
    assert torch.equal(markers.sum(dim=1), torch.full((32,), 2.0))
    assert bool((markers[:, :5].sum(dim=1) == 1).all())
    torch.testing.assert_close((x[..., 0] * markers).sum(dim=1), y)
    assert torch.equal(x[..., 0] * (1 - markers), torch.zeros(32, 10))


def test_stdlib_text_tokens():
    text = stdlib_text(5000)
    assert len(text) == 5000
    data = StdlibTextData(context=16, max_chars=5000, num_val=4, batch_size=4)
    data.setup()
    x, y = data._train[0]
    assert torch.equal(x[1:], y[:-1])
    assert int(x.min()) >= 0 and int(x.max()) < VOCAB_SIZE
    assert len(data._val) == 4


def test_evaluate_flags_non_finite_parameters():
    module, datamodule = build_workload("mlp", seed=0, **SMALL["mlp"])
    with torch.no_grad():
        module.head.weight[0, 0] = float("nan")
    assert evaluate(module, datamodule)["diverged"] is True


def test_mlp_threshold_follows_num_classes():
    assert DeepMLP.divergence_threshold == pytest.approx(math.log(10))
    assert DeepMLP(num_classes=4, depth=2, width=8).divergence_threshold == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: AddingProblemData(seq_len=0), "Expected `seq_len` to be a positive integer but got 0"),
        (lambda: AddingProblemData(seq_len=1), "Expected `seq_len` to be at least 2 but got 1"),
        (lambda: AddingProblemData(seed=-1), "Expected `seed` to be a non-negative integer but got -1"),
        (lambda: GaussianBlobsData(batch_size=0), "Expected `batch_size` to be a positive integer but got 0"),
        (lambda: GaussianBlobsData(separation=0.0), "Expected `separation` to be a positive finite number"),
        (lambda: StdlibTextData(val_fraction=1.0), "Expected `val_fraction` to be a number in \\(0, 1\\)"),
        (lambda: LongRangeRNN(lr=float("nan")), "Expected `lr` to be a positive finite number but got nan"),
        (lambda: LongRangeRNN(optimizer="rmsprop"), "Expected `optimizer` to be one of"),
        (lambda: DeepMLP(momentum=1.0), "Expected `momentum` to be a number in \\[0, 1\\) but got 1.0"),
        (lambda: CharTransformerLM(d_model=30, num_heads=4), "Expected `d_model` \\(30\\) to be divisible"),
        (lambda: build_workload("lstm"), "Expected `name` to be one of"),
        (lambda: build_workload("rnn", size="huge"), "Expected `size` to be 'test' or 'full'"),
        (lambda: build_workload("rnn", hidden=3), "Unknown arguments for workload 'rnn': \\['hidden'\\]"),
    ],
)
def test_bad_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_text_too_short_for_context():
    data = StdlibTextData(context=64, max_chars=100)
    with pytest.raises(ValueError, match="fewer than `context \\+ 1` = 65"):
        data.setup()


def test_transformer_rejects_long_input():
    module = CharTransformerLM(context=8, d_model=16, num_heads=2)
    with pytest.raises(ValueError, match="Expected at most 8 tokens per sequence but got 9"):
        module(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# the outcome suite's workloads (benchmarks/workloads.py)
# ---------------------------------------------------------------------------------------------------------------


def test_suite_split_holds_both_kinds_and_both_optimizer_families():
    sets = (SELECTION, CONFIRMATION, HOLDOUT)
    assert sum(len(members) for members in sets) == len(set().union(*sets)) == len(SUITE)  # disjoint, all of it
    every_kind = {(kind, family) for kind in ("healthy", "exploding") for family in ("sgd", "adam")}
    for members in sets:
        assert {(SUITE[n].kind, SUITE[n].family) for n in members} == every_kind
    kinds = [w.kind for w in SUITE.values()]
    assert kinds.count("healthy") >= 4 and kinds.count("exploding") >= 6


@pytest.mark.parametrize("name", sorted(SUITE))
def test_suite_workload_trains_two_steps(name):
    module, datamodule = build_suite_workload(name, seed=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        gradient_clip_val=0.1,  # some explode on their first steps without it
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    assert trainer.global_step == 2
    result = evaluate(module, datamodule)
    assert math.isfinite(result["final_loss"])
    assert module.divergence_threshold > 0


@pytest.mark.parametrize("name", ["lstm_chars", "conv_templates", "demo_transformer"])
def test_suite_workload_is_deterministic_for_a_seed(name):
    module_a, data_a = build_suite_workload(name, seed=1)
    module_b, data_b = build_suite_workload(name, seed=1)
    for a, b in zip(_first_batch(data_a), _first_batch(data_b)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(module_a.state_dict().values(), module_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_machine_text_is_fixed_and_checked():
    assert machine_text("licenses", 2000) == machine_text("licenses", 2000)
    assert len(machine_text("package_docs", 2000)) == 2000
    with pytest.raises(ValueError, match="Expected `source` to be one of"):
        machine_text("wikipedia", 100)
    with pytest.raises(ValueError, match="Expected `max_chars` to be a positive integer but got 0"):
        machine_text("licenses", 0)
    with pytest.raises(ValueError, match="fewer than `max_chars` = 1000000000000"):
        machine_text("licenses", 10**12)


def test_bad_batches_scale_the_inputs_at_their_steps():
    module = SuiteModule(
        nn.Linear(4, 1, bias=False), lambda out, y: out.pow(2).mean(), Optim("sgd", 0.1), 1.0, (0,), 1e3
    )
    batch = (torch.ones(2, 4), torch.zeros(2))
    assert module.global_step == 0  # no trainer: the first step, which is a bad one
    assert float(module.training_step(batch, 0)) == pytest.approx(1e6 * float(module.compute_loss(batch)))


def test_optim_schedule_warms_up_then_decays():
    config = Optim("adamw", 1.0, warmup=4, decay=10).build([nn.Parameter(torch.zeros(1))])
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[10:] == pytest.approx([0.1, 0.1])


def test_adding_problem_noise_floor():
    clean = AddingProblemData(seq_len=10, num_train=2048, num_val=8, batch_size=8)
    noisy = AddingProblemData(seq_len=10, num_train=2048, num_val=8, batch_size=8, noise_std=0.1)
    clean.setup()
    noisy.setup()
    torch.testing.assert_close(clean._train.tensors[0], noisy._train.tensors[0])
    noise = noisy._train.tensors[1] - clean._train.tensors[1]
    assert float(noise.std()) == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError, match="Expected `noise_std` to be a non-negative finite number but got -1"):
        AddingProblemData(noise_std=-1)
