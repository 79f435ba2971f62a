"""The base class of every gradguard callback, and the pipeline they share.

Lightning calls ``on_before_optimizer_step`` on each callback in list order. The first gradguard callback called
in a step runs the whole pipeline for all of them, in an order fixed once per fit whatever the list order:

    measure (GradientNormMonitor) -> detect (ExplosionGuard) -> clip (GradientClipping) -> quantize

The gradients are gathered once and their norms computed once (:class:`GradStep`); every stage reads and updates
that one record. Values to log go into one device buffer, read to the host once every ``flush_interval`` steps.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard.callbacks._lightning import classes, logging_step, torch_optimizer
from lightning_gradguard.events import EVENTS_FILE, EventLog, ExplosionEvent
from lightning_gradguard.functional.norms import StepGradients
from lightning_gradguard.logging.buffer import DeferredBuffer, FlushResult
from lightning_gradguard.logging.tensorboard import histogram_stats, write_histogram, write_layout

__all__ = ["GradGuardCallback", "GradStep", "check_positive_int"]

TAG_PREFIX = "gradguard"


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> Optional[int]:
    """Return ``value`` if it is a positive int (or ``None`` when allowed), else raise naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"Expected `{name}` to be {expected} but got {value!r}")
    return value


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise for strategies whose gradients gradguard cannot see whole; warn for untested ones."""
    strategy = trainer.strategy
    if isinstance(strategy, classes("strategies", "DeepSpeedStrategy")):
        raise RuntimeError(
            f"{owner} does not support DeepSpeedStrategy: DeepSpeed partitions and clips gradients in its own engine,"
            " out of reach of `on_before_optimizer_step`. Use `strategy='ddp'` or FSDP2 through"
            " `ModelParallelStrategy` (with `fully_shard` in `configure_model`)."
        )
    if isinstance(strategy, classes("strategies", "FSDPStrategy")):
        raise RuntimeError(
            f"{owner} does not support FSDPStrategy (FSDP1): its flattened, sharded gradients have no per-parameter"
            " shape, so per-layer norms and full-tensor statistics cannot be computed. Use FSDP2 through"
            " `ModelParallelStrategy(data_parallel_size=N)` with `fully_shard` in `configure_model`."
        )
    supported = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")
    if not isinstance(strategy, classes("strategies", *supported)):
        rank_zero_warn(f"{owner} has not been tested with {type(strategy).__name__}; tested: {', '.join(supported)}.")


class GradStep(StepGradients):
    """One optimizer step as the pipeline's stages see it: the gradients and norms of
    :class:`~lightning_gradguard.functional.norms.StepGradients`, plus where to log and what was decided.

    Attributes:
        step: the step values are logged at (Lightning's logging step: batches that stepped).
        global_step: ``trainer.global_step``.
        optimizer, optimizer_idx: the torch optimizer and its index in ``trainer.optimizers``.
        optimizer_step: how many steps this optimizer took before this one in this fit (for logging intervals).
        clip_coef, clip_threshold, clipped_norm: set by the clipping stage (device tensors) or ``None``.
        skipped: set when the guard decided on the host that this step changes nothing (gradients dropped);
            ``rewound`` when it also restored a snapshot. The callbacks then get :meth:`GradGuardCallback.on_skip`.
        nonfinite_ranks: with compressed DDP communication, a device bool per rank: its own gradients were not
            finite before the reduction (``None`` otherwise).
    """

    def __init__(self, pipeline: Pipeline, params: list[Tensor], names: list[str], **fields: Any) -> None:
        super().__init__(params, names, with_units=pipeline.needs_units, optimizer=fields["optimizer"])
        self.pipeline = pipeline
        self.step: int = fields["step"]
        self.global_step: int = fields["global_step"]
        self.optimizer: torch.optim.Optimizer = fields["optimizer"]
        self.optimizer_idx: int = fields["optimizer_idx"]
        self.optimizer_step: int = fields["optimizer_step"]
        self.clip_coef: Optional[Tensor] = None
        self.clip_threshold: Optional[Tensor] = None
        self.clipped_norm: Optional[Tensor] = None
        self.skipped = False
        self.rewound = False
        self.nonfinite_ranks: Optional[Tensor] = fields.get("nonfinite_ranks")

    def tag(self, name: str) -> str:
        """``gradguard/<name>``, or ``gradguard/opt<i>/<name>`` when the trainer has several optimizers."""
        prefix = f"{TAG_PREFIX}/opt{self.optimizer_idx}" if self.pipeline.multi_optimizer else TAG_PREFIX
        return f"{prefix}/{name}"

    # logging: appends device tensors, never reads them; a no-op where nothing is recorded (rank > 0, no logger)
    def log(self, name: str, value: Union[Tensor, float]) -> None:
        if self.pipeline.records:
            self.pipeline.buffer.add_scalar(self.step, self.tag(name), value)

    def log_vector(self, names: list[str], values: Tensor) -> None:
        if self.pipeline.records:
            self.pipeline.buffer.add_vector(self.step, [self.tag(n) for n in names], values)

    def log_histograms(self) -> None:
        """Gradient histograms of every tensor, computed on the device, written to TensorBoard at the flush."""
        writer = self.pipeline.tensorboard
        if writer is None:
            return
        for name, grad in zip(self.names, self.local_grads):
            tag = self.tag(f"hist/{name}")
            sink = lambda step, values, tag=tag: write_histogram(writer, tag, step, values)  # noqa: E731
            self.pipeline.buffer.add_custom(self.step, histogram_stats(grad), sink)

    def drop_gradients(self) -> None:
        """Make the optimizer step a no-op: ``torch.optim`` optimizers skip parameters whose ``grad`` is ``None``,
        so neither parameters nor optimizer state (moments, step counts, weight decay) change."""
        for p in self.params:
            p.grad = None
        self.skipped = True


class Pipeline:
    """What the gradguard callbacks of one Trainer share during a fit (not checkpointed: callbacks own their state,
    but for the run id and attempt number of the events, kept in the checkpoint under ``"gradguard_run"``)."""

    def __init__(self, trainer: pl.Trainer, callbacks: list[GradGuardCallback]) -> None:
        self.trainer = trainer
        self.callbacks = sorted(callbacks, key=lambda cb: cb.stage)  # stable: equal stages keep list order
        intervals = [cb.flush_interval for cb in callbacks if cb.flush_interval is not None]
        self.flush_interval = min(intervals) if intervals else max(1, int(trainer.log_every_n_steps))
        self.callback_metrics = any(cb.callback_metrics for cb in callbacks)
        self.needs_units = any(cb.needs_unit_norms for cb in callbacks)
        self.buffer = DeferredBuffer()
        self.writes_logs = False
        self.records = False
        self.multi_optimizer = False
        self.tensorboard: Optional[Any] = None
        self.events = EventLog()
        self.communication: Optional[Any] = None  # a QuantizedCommState when DDP's communication is compressed
        self._resumed_run: Optional[dict[str, Any]] = None
        self._params: dict[int, tuple[list[Tensor], list[str]]] = {}
        self._optimizer_steps: Counter = Counter()
        self._last: Optional[tuple[int, int]] = None
        self._since_flush = 0

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit start: loggers, the TensorBoard layout, the parameters of each optimizer."""
        self.writes_logs = bool(trainer.loggers) and trainer.is_global_zero
        self.records = self.writes_logs or self.callback_metrics
        tensorboard_loggers = classes("loggers", "TensorBoardLogger")
        self.tensorboard = next(
            (lg.experiment for lg in trainer.loggers if isinstance(lg, tensorboard_loggers)), None
        ) if self.writes_logs else None
        self.multi_optimizer = len(trainer.optimizers) > 1
        for optimizer in trainer.optimizers:
            self._params_of(torch_optimizer(optimizer), pl_module)
        charts: dict[str, list[str]] = {}
        for cb in self.callbacks:
            for title, tags in cb.charts().items():
                charts.setdefault(title, []).extend(t for t in tags if t not in charts.get(title, []))
        if self.tensorboard is not None and charts:
            write_layout(self.tensorboard, charts)

    def start_training(self, trainer: pl.Trainer) -> None:
        """Train start, after any checkpoint was restored: where the events go."""
        log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
        path = Path(log_dir) / EVENTS_FILE if log_dir and trainer.is_global_zero else None
        run = self._resumed_run or {}
        attempt = int(run.get("attempt", 0)) + 1
        self.events = EventLog(path, self.tensorboard, run_id=run.get("run_id"), attempt=attempt)

    def run_state(self) -> dict[str, Any]:
        return {"run_id": self.events.run_id, "attempt": self.events.attempt}

    def load_run_state(self, state: Optional[dict[str, Any]]) -> None:
        self._resumed_run = state

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        optimizer = torch_optimizer(optimizer)
        key = (id(optimizer), trainer.global_step)
        if key == self._last:  # another gradguard callback ran the pipeline for this step already
            return
        self._last = key
        params, names = self._params.get(id(optimizer)) or self._params_of(optimizer, pl_module)
        index = next((i for i, o in enumerate(trainer.optimizers) if torch_optimizer(o) is optimizer), 0)
        step = GradStep(
            self,
            params,
            names,
            step=logging_step(trainer),
            global_step=trainer.global_step,
            optimizer=optimizer,
            optimizer_idx=index,
            optimizer_step=self._optimizer_steps[index],
            nonfinite_ranks=None if self.communication is None else self.communication.stats.nonfinite_ranks,
        )
        self._optimizer_steps[index] += 1
        for cb in self.callbacks:
            if step.skipped:
                break
            cb.process_step(trainer, pl_module, step)
        if step.skipped:
            for cb in self.callbacks:
                cb.on_skip(trainer, step)
        self._since_flush += 1

    def _params_of(self, optimizer: torch.optim.Optimizer, pl_module: pl.LightningModule) -> tuple[list, list]:
        """The parameters of ``optimizer`` and their names, looked up once per fit."""
        name_of = {id(p): n for n, p in pl_module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._params[id(optimizer)] = (params, [name_of.get(id(p), f"param_{i}") for i, p in enumerate(params)])
        return self._params[id(optimizer)]

    def maybe_flush(self, trainer: pl.Trainer) -> None:
        if self._since_flush >= self.flush_interval:
            self.flush(trainer)

    def flush(self, trainer: pl.Trainer) -> None:
        """One host read of everything buffered; callbacks see the values, then the loggers get them."""
        self._since_flush = 0
        if not len(self.buffer):
            return
        result = self.buffer.flush()
        events: list[ExplosionEvent] = []
        for cb in self.callbacks:
            events += cb.on_flush(trainer, result) or []
        self.events.write(sorted(events, key=lambda e: e.step))
        if self.callback_metrics and result.metrics:
            latest: dict[str, float] = {}
            for metrics in result.metrics.values():
                latest.update(metrics)
            trainer.callback_metrics.update({tag: torch.tensor(value) for tag, value in latest.items()})
        if self.writes_logs:
            for logger in trainer.loggers:
                for step, metrics in result.metrics.items():
                    if metrics:
                        logger.log_metrics(metrics, step=step)
                logger.save()


class GradGuardCallback(Callback):
    """Base class: runs the shared gradguard pipeline once per optimizer step and flushes its buffer.

    Subclasses set :attr:`stage`, implement :meth:`process_step`, and may contribute custom-scalars charts
    (:meth:`charts`) and read the flushed values or return events (:meth:`on_flush`).

    Args:
        flush_interval: optimizer steps between two writes to the loggers (one host read each). ``None`` uses the
            Trainer's ``log_every_n_steps``. With several gradguard callbacks the smallest interval wins.
        callback_metrics: also put the latest flushed values into ``trainer.callback_metrics`` (on every rank), so
            that ``EarlyStopping`` or ``ModelCheckpoint`` can monitor e.g. ``gradguard/grad_norm``. With several
            gradguard callbacks one that asks is enough.
    """

    stage: ClassVar[int] = 0
    needs_unit_norms: bool = False
    """whether :meth:`process_step` reads ``GradStep.units`` (row norms, computed with the norms)"""

    def __init__(self, flush_interval: Optional[int] = None, callback_metrics: bool = False) -> None:
        self.flush_interval = check_positive_int(flush_interval, "flush_interval", allow_none=True)
        if not isinstance(callback_metrics, bool):
            raise TypeError(f"Expected `callback_metrics` to be a bool but got {type(callback_metrics).__name__}")
        self.callback_metrics = callback_metrics
        self._pipeline: Optional[Pipeline] = None

    # for subclasses -------------------------------------------------------------------------------------------
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        """Work on one optimizer step's gradients. Must not read device values back to the host."""

    def charts(self) -> dict[str, list[str]]:
        """Custom-scalars charts this callback contributes: ``{title: [tag regex, ...]}``."""
        return {}

    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> Optional[list[ExplosionEvent]]:
        """Called at every flush with the host values just read; may add metrics and return events to write."""
        return None

    def on_skip(self, trainer: pl.Trainer, step: GradStep) -> None:
        """Called after a step the guard skipped (``step.skipped``; ``step.rewound`` after a rewind)."""

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Trainer-dependent argument checks, called from ``setup``."""

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a fitting Trainer")
        return self._pipeline

    # Lightning hooks ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        check_strategy(trainer, owner)
        ours = [cb for cb in trainer.callbacks if isinstance(cb, GradGuardCallback)]
        if sum(type(cb) is type(self) for cb in ours) > 1:
            raise ValueError(f"Found {sum(type(cb) is type(self) for cb in ours)} {owner} callbacks on the Trainer;"
                             " attach at most one.")
        if ours[0] is self:  # Lightning sets callbacks up in list order: the first one makes the fit's pipeline
            pipeline = Pipeline(trainer, ours)
            for cb in ours:
                cb._pipeline = pipeline
            if not trainer.loggers and not pipeline.callback_metrics:
                rank_zero_warn("gradguard: the Trainer has no logger, so gradient values are computed but not written.")
        self.check_setup(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pipeline.callbacks[0] is self:
            self.pipeline.start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pipeline.callbacks[0] is self:
            self.pipeline.start_training(trainer)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.pipeline.run(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self.pipeline.maybe_flush(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pipeline.flush(trainer)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # write what is buffered first, so a resumed run neither loses nor repeats a logged step
        self.pipeline.flush(trainer)
        checkpoint["gradguard_run"] = self.pipeline.run_state()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.pipeline.load_run_state(checkpoint.get("gradguard_run"))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._pipeline is not None:
            self._pipeline.flush(trainer)
