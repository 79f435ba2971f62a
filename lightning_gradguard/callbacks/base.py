"""The base class of every gradguard callback: shared hooks, strategy checks, flush wiring."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_gradguard.callbacks._runtime import (
    GradStep,
    callbacks_of,
    get_runtime,
    warn_no_logger_once,
)
from lightning_gradguard.logging.buffer import FlushResult

__all__ = ["GradGuardCallback", "check_positive_int", "check_strategy"]

# pipeline stages: lower runs first within one optimizer step
STAGE_MONITOR = 0
STAGE_GUARD = 10
STAGE_CLIP = 20
STAGE_QUANTIZE = 30


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> Optional[int]:
    """Return ``value`` if it is a positive int (or ``None`` when allowed), else raise naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"Expected `{name}` to be {expected} but got {value!r}")
    return value


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise for strategies whose gradients gradguard cannot see whole; warn for unknown ones."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        raise RuntimeError(
            f"{owner} does not support DeepSpeedStrategy: DeepSpeed partitions and clips gradients inside its own engine,"
            " out of reach of `on_before_optimizer_step`. Use `strategy='ddp'` or FSDP2 through"
            " `ModelParallelStrategy` (with `fully_shard` in `configure_model`)."
        )
    if isinstance(strategy, FSDPStrategy):
        raise RuntimeError(
            f"{owner} does not support FSDPStrategy (FSDP1): its flattened, sharded gradients have no per-parameter"
            " shape, so per-layer norms and full-tensor statistics cannot be computed. Use FSDP2 through"
            " `ModelParallelStrategy(data_parallel_size=N)` with `fully_shard` in `configure_model`."
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
        rank_zero_warn(
            f"{owner} has not been tested with {type(strategy).__name__}; supported: SingleDeviceStrategy,"
            " DDPStrategy, ModelParallelStrategy (FSDP2)."
        )


class GradGuardCallback(Callback):
    """Base class: runs the shared gradguard pipeline once per optimizer step and flushes the shared log buffer.

    Subclasses set :attr:`stage`, implement :meth:`process_step` and may contribute custom-scalars charts
    through :meth:`charts` and extra metrics at flush time through :meth:`on_flush`.

    Args:
        flush_interval: optimizer steps between two writes to the loggers (one host read each). ``None`` uses the
            Trainer's ``log_every_n_steps``. With several gradguard callbacks the smallest interval wins.
    """

    stage: int = STAGE_MONITOR
    needs_unit_norms: bool = False
    """whether :meth:`process_step` uses the row-wise gradient norms (``GradStep.unit_norms``)"""

    def __init__(self, flush_interval: Optional[int] = None) -> None:
        self.flush_interval = check_positive_int(flush_interval, "flush_interval", allow_none=True)

    # to be implemented by subclasses --------------------------------------------------------------------------
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        """Work on one optimizer step's gradients. Must not read device values back to the host."""

    def charts(self) -> dict[str, list[str]]:
        """Custom-scalars charts this callback contributes: ``{title: [tag regex, ...]}``."""
        return {}

    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> None:
        """Called at every flush with the host values just read (may add metrics to ``result``)."""

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Trainer-dependent argument checks, called from ``setup``."""

    # Lightning hooks ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        check_strategy(trainer, owner)
        same = [cb for cb in callbacks_of(trainer) if type(cb) is type(self)]
        if len(same) > 1:
            raise ValueError(f"Found {len(same)} {owner} callbacks on the Trainer; attach at most one.")
        self.check_setup(trainer, pl_module)
        warn_no_logger_once(trainer, owner)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # loggers and the global rank are final here (setup may run before the logger's directory exists)
        runtime = get_runtime(trainer)
        callbacks = callbacks_of(trainer)
        if callbacks and callbacks[0] is self:
            runtime.setup(trainer, callbacks)
            runtime.write_layout(callbacks)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        get_runtime(trainer).run(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        get_runtime(trainer).maybe_flush(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        get_runtime(trainer).flush(trainer)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # write what is buffered before the checkpoint, so a resumed run neither loses nor repeats a step
        get_runtime(trainer).flush(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        get_runtime(trainer).flush(trainer)
