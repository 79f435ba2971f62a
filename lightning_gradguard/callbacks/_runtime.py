"""The per-trainer runtime that every gradguard callback shares.

Lightning calls ``on_before_optimizer_step`` on each callback in list order. The first gradguard callback to be
called in a step runs the whole pipeline for all gradguard callbacks on the trainer, in a fixed order that does
not depend on the list order:

    measure (monitor) -> detect (guard) -> clip -> quantize

The gradients are gathered once and their per-tensor and global L2 norms computed once (:class:`GradStep`);
every stage reads and updates that one record. Values to log go into one :class:`DeferredBuffer` per trainer,
flushed with a single host read every ``flush_interval`` optimizer steps.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_gradguard.functional.detection import Finiteness
from lightning_gradguard.functional.norms import _norms_of, _unit_norms_of, grad_norms, local_shards
from lightning_gradguard.logging.buffer import DeferredBuffer, FlushResult
from lightning_gradguard.logging.tensorboard import (
    find_tensorboard_writer,
    histogram_stats,
    write_histogram,
    write_layout,
    write_scalars,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_gradguard.callbacks.base import GradGuardCallback

__all__ = ["GradStep", "Runtime", "get_runtime", "unwrap_optimizer"]

TAG_PREFIX = "gradguard"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


class GradStep(Finiteness):
    """The gradients of one optimizer step and what the gradguard stages decided about them.

    Attributes:
        step: ``trainer.global_step`` when the step began (the step number every value is logged with).
        optimizer_idx: index of the optimizer in ``trainer.optimizers``.
        params, names, grads: parameters that have a gradient this step, their names, their gradients
            (``DTensor`` under FSDP2); ``local_grads`` are the local shards, views that in-place ops write through.
        per_tensor_norms, total_norm: full-tensor L2 norms before any stage changed the gradients (float32,
            on the device).
        unit_norms: the row-wise norms (:func:`~lightning_gradguard.functional.norms.unit_norms`) when a stage
            asked for them (``needs_unit_norms``), computed in the same pass as the norms above; else ``None``.
        finite, nonfinite: device bools, whether the global norm is finite (computed once, for every stage).
        clip_coef, clip_threshold, clipped_norm: set by the clipping stage (device tensors) or ``None``.
        skipped: set by the guard when it decided (on the host) that this step must not change anything.
    """

    def __init__(
        self,
        runtime: Runtime,
        step: int,
        optimizer: torch.optim.Optimizer,
        optimizer_idx: int,
        params: list[Tensor],
        names: list[str],
        multi_optimizer: bool,
        with_unit_norms: bool = False,
        grads: Optional[list[Tensor]] = None,
    ) -> None:
        self.runtime = runtime
        self.step = step
        self.optimizer = optimizer
        self.optimizer_idx = optimizer_idx
        self.params = params
        self.names = names
        self.grads: list[Tensor] = [p.grad for p in params] if grads is None else grads  # type: ignore[misc]
        self.local_grads: list[Tensor] = local_shards(self.grads)
        self._multi_optimizer = multi_optimizer
        self.unit_norms: Optional[Tensor] = None
        with torch.no_grad():  # statistics of the gradients, never part of a graph (even after create_graph=True)
            if with_unit_norms and self.grads:  # a stage needs row norms (AGC): the tensors' norms in the same pass
                # into the runtime's reusable buffer: the units are only used within this step
                units = _unit_norms_of(self.grads, self.local_grads, None, runtime.unit_buffers)
                self.unit_norms, self.per_tensor_norms, self.total_norm = units.units, units.per_tensor, units.total
            else:
                self.per_tensor_norms, self.total_norm = (
                    _norms_of(self.grads, self.local_grads, 2.0, None) if self.grads else grad_norms([])
                )
        # a norm is >= 0 or NaN: below inf exactly when finite (one comparison, where isfinite takes several)
        self.finite: Tensor = self.total_norm < math.inf
        self.clip_coef: Optional[Tensor] = None
        self.clip_threshold: Optional[Tensor] = None
        self.clipped_norm: Optional[Tensor] = None
        self.skipped = False
        self._norm_cache: dict[float, tuple[Tensor, Tensor]] = {2.0: (self.per_tensor_norms, self.total_norm)}

    def norms(self, norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
        """Per-tensor and global norms of the gradients as they were when the step began (cached per ``p``)."""
        if norm_type not in self._norm_cache:
            self._norm_cache[norm_type] = grad_norms(self.grads, norm_type)
        return self._norm_cache[norm_type]

    @property
    def device(self) -> torch.device:
        return self.total_norm.device

    def tag(self, name: str) -> str:
        """``gradguard/<name>``, or ``gradguard/opt<i>/<name>`` when the trainer has several optimizers."""
        if self._multi_optimizer:
            return f"{TAG_PREFIX}/opt{self.optimizer_idx}/{name}"
        return f"{TAG_PREFIX}/{name}"

    # logging: appends device tensors, never reads them; a no-op where nothing is written (rank > 0, no logger)
    def log(self, name: str, value: Tensor) -> None:
        if self.runtime.writes_logs:
            self.runtime.buffer.add_scalar(self.step, self.tag(name), value)

    def log_vector(self, tags: list[str], values: Tensor) -> None:
        if self.runtime.writes_logs:
            self.runtime.buffer.add_vector(self.step, tags, values)

    def log_custom(self, values: Tensor, sink: Callable[[int, list], None]) -> None:
        if self.runtime.writes_logs:
            self.runtime.buffer.add_custom(self.step, values, sink)

    def log_histograms(self, prefix: str = "hist") -> None:
        """Gradient histograms of every tensor, computed on the device, written to TensorBoard at the flush."""
        writer = self.runtime.tensorboard_writer
        if writer is None or not self.runtime.writes_logs:
            return
        for name, grad in zip(self.names, self.local_grads):
            tag = f"{TAG_PREFIX}/{prefix}/{name}"
            self.runtime.buffer.add_custom(
                self.step, histogram_stats(grad), lambda step, values, tag=tag: write_histogram(writer, tag, step, values)
            )

    def drop_gradients(self) -> None:
        """Make the optimizer step a no-op: ``torch.optim`` optimizers skip parameters whose ``grad`` is ``None``,
        so neither parameters nor optimizer state (moments, step counts, weight decay) change."""
        for p in self.params:
            p.grad = None
        self.skipped = True


class Runtime:
    """State shared by the gradguard callbacks of one trainer (not checkpointed: callbacks own their state)."""

    def __init__(self) -> None:
        self.buffer = DeferredBuffer()
        self.flush_interval = 50
        self.writes_logs = False
        self.tensorboard_writer: Optional[Any] = None
        self._param_cache: dict[int, tuple[list[Tensor], list[str]]] = {}
        self._last_key: Optional[tuple] = None
        self._steps_since_flush = 0
        self._layout_written = False
        self.current: Optional[GradStep] = None
        self.unit_buffers: dict = {}  # reusable buffers for the row norms of each step (see `functional.norms`)

    # set-up -------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, callbacks: list[GradGuardCallback]) -> None:
        intervals = [cb.flush_interval for cb in callbacks if cb.flush_interval is not None]
        self.flush_interval = min(intervals) if intervals else max(1, int(trainer.log_every_n_steps))
        self.writes_logs = bool(trainer.loggers) and trainer.is_global_zero
        self.tensorboard_writer = find_tensorboard_writer(trainer) if self.writes_logs else None
        self._param_cache.clear()
        self._last_key = None

    def write_layout(self, callbacks: list[GradGuardCallback]) -> None:
        if self._layout_written or self.tensorboard_writer is None:
            return
        charts: dict[str, list[str]] = {}
        for cb in callbacks:
            for title, tags in cb.charts().items():
                charts.setdefault(title, [])
                charts[title].extend(t for t in tags if t not in charts[title])
        if charts:
            write_layout(self.tensorboard_writer, charts)
        self._layout_written = True

    # the per-step pipeline ----------------------------------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        optimizer = unwrap_optimizer(optimizer)
        key = (id(optimizer), trainer.global_step)
        if key == self._last_key:  # another gradguard callback already ran the pipeline for this step
            return
        self._last_key = key
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        idx = next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
        params, names = self._params_of(optimizer, pl_module)
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # parameters without a gradient this step are left out
            kept = [i for i, g in enumerate(grads) if g is not None]
            params, names, grads = [params[i] for i in kept], [names[i] for i in kept], [grads[i] for i in kept]
        callbacks = callbacks_of(trainer)
        step = GradStep(
            self,
            trainer.global_step,
            optimizer,
            idx,
            params,
            names,
            multi_optimizer=len(optimizers) > 1,
            with_unit_norms=any(cb.needs_unit_norms for cb in callbacks),
            grads=grads,
        )
        self.current = step
        for cb in callbacks:
            if step.skipped:
                break
            cb.process_step(trainer, pl_module, step)
        self._steps_since_flush += 1

    def _params_of(self, optimizer: torch.optim.Optimizer, pl_module: pl.LightningModule) -> tuple[list, list]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        cached = self._param_cache.get(id(optimizer))
        if cached is not None and len(cached[0]) == len(params) and all(a is b for a, b in zip(cached[0], params)):
            return cached
        name_of = {id(p): n for n, p in pl_module.named_parameters()}
        names = [name_of.get(id(p), f"param_{i}") for i, p in enumerate(params)]
        self._param_cache[id(optimizer)] = (params, names)
        return params, names

    # flushing -----------------------------------------------------------------------------------------------
    def maybe_flush(self, trainer: pl.Trainer) -> None:
        if self._steps_since_flush >= self.flush_interval:
            self.flush(trainer)

    def flush(self, trainer: pl.Trainer) -> None:
        self._steps_since_flush = 0
        if not len(self.buffer):
            return
        result: FlushResult = self.buffer.flush()
        for cb in callbacks_of(trainer):
            cb.on_flush(trainer, result)
        if not self.writes_logs:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            bulk = isinstance(logger, TensorBoardLogger)  # one event per step rather than one per value
            for step, metrics in result.metrics.items():
                if metrics:
                    if bulk:
                        write_scalars(logger, metrics, step)
                    else:
                        logger.log_metrics(metrics, step=step)
            logger.save()


_RUNTIMES: "weakref.WeakKeyDictionary[Any, Runtime]" = weakref.WeakKeyDictionary()


def get_runtime(trainer: pl.Trainer) -> Runtime:
    runtime = _RUNTIMES.get(trainer)
    if runtime is None:
        runtime = _RUNTIMES[trainer] = Runtime()
    return runtime


def callbacks_of(trainer: pl.Trainer) -> list[GradGuardCallback]:
    """The gradguard callbacks of ``trainer`` in pipeline order (stable for equal stages)."""
    from lightning_gradguard.callbacks.base import GradGuardCallback

    found = [cb for cb in trainer.callbacks if isinstance(cb, GradGuardCallback)]
    return sorted(found, key=lambda cb: cb.stage)


def warn_no_logger_once(trainer: pl.Trainer, owner: str) -> None:
    runtime = get_runtime(trainer)
    if not trainer.loggers and not getattr(runtime, "_warned_no_logger", False):
        runtime._warned_no_logger = True  # type: ignore[attr-defined]
        rank_zero_warn(f"{owner}: the Trainer has no logger, so gradguard values are computed but not written anywhere.")


def is_finite_number(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
