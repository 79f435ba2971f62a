"""Strategies the callbacks cannot serve are refused at setup with an error that names the alternative.

FSDP1 (``FSDPStrategy``) needs a GPU and DeepSpeed needs the ``deepspeed`` package: Lightning will not build a
Trainer with either on this CPU machine, so the check is given the real strategy objects through the one attribute
it reads (``trainer.strategy``). The supported strategies are exercised by real 2-process runs elsewhere."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy

from lightning_gradguard import ExplosionGuard, GradientClipping, GradientNormMonitor, GradientQuantization
from lightning_gradguard.callbacks.base import check_strategy

CALLBACKS = [GradientNormMonitor, GradientClipping, ExplosionGuard, GradientQuantization]


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_fsdp1_is_refused_with_the_fsdp2_alternative(callback):
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(
        RuntimeError,
        match=rf"{callback.__name__} does not support FSDPStrategy \(FSDP1\).*"
        r"ModelParallelStrategy\(data_parallel_size=N\)",
    ):
        callback().setup(trainer, None, "fit")


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_deepspeed_is_refused(callback):
    strategy = object.__new__(DeepSpeedStrategy)  # the real class; constructing it needs the deepspeed package
    with pytest.raises(RuntimeError, match=rf"{callback.__name__} does not support DeepSpeedStrategy.*strategy='ddp'"):
        callback().setup(SimpleNamespace(strategy=strategy), None, "fit")


def test_supported_strategy_passes_and_unknown_one_warns():
    import torch

    check_strategy(SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu"))), "GradientNormMonitor")

    class CustomStrategy(Strategy):  # a user's own strategy: allowed, with a warning
        pass

    CustomStrategy.__abstractmethods__ = frozenset()  # only its type matters here

    with pytest.warns(UserWarning, match="GradientNormMonitor has not been tested with CustomStrategy"):
        check_strategy(SimpleNamespace(strategy=object.__new__(CustomStrategy)), "GradientNormMonitor")


def test_setup_outside_fit_checks_nothing():
    GradientClipping().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "validate")
