"""ExplosionGuard: detect explosion events at every optimizer step, answer them, and report them."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard.callbacks._lightning import found_inf, grad_scaler, loss_scale, takes_found_inf
from lightning_gradguard.callbacks._lightning import torch_optimizer
from lightning_gradguard.callbacks._rewind import STEP_LR, Schedule, SnapshotDevice, TrainingSnapshot
from lightning_gradguard.callbacks.base import TAG_PREFIX, GradGuardCallback, GradStep, check_positive_int
from lightning_gradguard.events import EVENT_KINDS, ExplosionEvent, summary_table
from lightning_gradguard.functional.detection import STATISTICS, SpikeCheck, SpikeDetector, Statistic, top_layers
from lightning_gradguard.logging.buffer import FlushResult
from lightning_gradguard.utilities import to_device

__all__ = ["ExplosionGuard", "GradientExplosionError"]

Response = Literal["log", "skip", "raise", "rewind"]
RESPONSES = ("log", "skip", "raise", "rewind")
# the response a step gets is the most severe one among its events (ranks agree on the MAX)
_SEVERITY = {"log": 0, "skip": 1, "rewind": 2, "raise": 3}
_KIND = {kind: i for i, kind in enumerate(EVENT_KINDS)}
_DESCRIPTIONS = {
    "nonfinite": "non-finite gradients or loss",
    "spike": "a gradient-norm spike",
    "loss_spike": "a loss spike",
    "threshold": "the gradient norm crossed `max_norm`",
    "scale_collapse": "the AMP loss scale collapsed",
}
_HINTS = {
    "nonfinite": "find the batch or operation that produced NaN/Inf (log of 0, division by zero, an fp16 overflow:"
    " try precision='bf16-mixed'; torch.autograd.set_detect_anomaly(True) names the operation), lower the learning"
    " rate, or use on_nonfinite='skip' to step over isolated bad batches.",
    "spike": "lower the learning rate or add warm-up, attach GradientClipping, check the data around this step, or"
    " use on_spike='skip' / 'rewind' to ride spikes out.",
    "scale_collapse": "every step overflows fp16 even at a tiny loss scale: the values themselves are out of range."
    " Use precision='bf16-mixed', lower the learning rate, or find the layer that overflows.",
}


class _Where(NamedTuple):
    """What an event needs to know of its step (kept until the flush instead of the step's gradients)."""

    step: int
    global_step: int
    epoch: int
    optimizer_idx: int
    names: list[str]


class GradientExplosionError(RuntimeError):
    """Raised by :class:`ExplosionGuard` to stop ``fit``. ``event`` is the event that triggered it and ``report``
    its markdown report (also written to TensorBoard and to ``gradguard_events.jsonl`` before the raise)."""

    def __init__(self, message: str, event: ExplosionEvent) -> None:
        super().__init__(message)
        self.event = event
        self.report = event.to_markdown()


class ExplosionGuard(GradGuardCallback):
    r"""Detect explosion events at every optimizer step, answer them (log, skip, raise, rewind) and report them.

    Detection runs on the device after gradient accumulation and AMP unscaling, before any clipping. Events:
    ``nonfinite`` (NaN/Inf gradient norm or loss), ``spike`` / ``loss_spike`` (more than ``threshold`` spreads above
    the median, or mean, of the last ``window`` finite values of that optimizer, after ``warmup`` values),
    ``threshold`` (norm above ``max_norm``), ``overflow`` (16-mixed: the grad scaler skips the step itself; recorded,
    not answered, while a NaN *loss* is ``nonfinite``) and ``scale_collapse`` (the loss scale fell below 1, or the
    scaler skipped ``max_consecutive_skips`` steps in a row; it raises unless ``on_nonfinite="log"``). Under several
    processes every rank's flags are combined: a fault seen by one rank is recorded with that rank, and answered on
    every rank.

    Responses (``on_nonfinite``; ``on_spike`` covers ``spike``, ``loss_spike`` and ``threshold``): ``"log"`` records;
    ``"skip"`` leaves parameters and optimizer state bitwise intact (Lightning still counts the step in
    ``global_step``; step-interval LR schedulers advance, or hold with ``schedule_on_skip="hold"``), and raises after
    ``max_consecutive_skips`` skips in a row; ``"raise"`` stops ``fit`` with :class:`GradientExplosionError` naming
    the step, the norm, the worst layers and what to try; ``"rewind"`` keeps an in-memory snapshot of the model,
    optimizer and LR schedule (at the first step of every fit, then every ``snapshot_interval`` steps at a healthy
    step), skips flagged steps, and after ``rewind_patience`` of them in a row restores the snapshot (the next step
    runs at the snapshot step's learning rate) with every learning rate multiplied by ``lr_factor`` per rewind
    inside each optimizer step, so schedulers keep their own schedule; after ``max_rewinds`` it raises. After a
    resume the snapshot is the resumed state: the decisions are those of an uninterrupted run.

    Cost: ``"log"`` reads nothing on the host. Other responses read one scalar per optimizer step, except ``"skip"``
    with optimizers that take GradScaler's device flag (``Adam``, ``AdamW``, ``SGD`` with ``fused=True``), without a
    GradScaler, compressed communication or ``schedule_on_skip="hold"``: the update is then skipped on the device and
    skips are counted (and ``max_consecutive_skips`` checked) at the flush. Under several processes the flags and the
    per-rank losses are all-reduced once per step.

    Reported on rank 0: ``gradguard_events.jsonl`` in the logger's directory (:mod:`lightning_gradguard.events`), the
    TensorBoard text ``gradguard/events``, the running counts ``gradguard/events/<kind>``, ``gradguard/guard/skipped``
    and ``gradguard/guard/rewinds`` where they change, an "events" chart, and a summary table at the end of ``fit``.

    Args:
        on_nonfinite: response to non-finite gradients or loss.
        on_spike: response to gradient-norm spikes, loss spikes and ``max_norm`` crossings.
        threshold: z-score above which a value is a spike.
        window: number of recent finite values the running statistics cover.
        warmup: values needed in the window before spikes are flagged (at most ``window``).
        statistic: ``"median"`` (median and MAD, robust to the spikes themselves) or ``"mean"`` (mean and std).
        detect_loss: also watch the loss (non-finite and spikes).
        max_norm: absolute gradient-norm limit (``threshold`` events), or ``None``.
        top_k: number of layers named in each event.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never).
        schedule_on_skip: ``"advance"`` (default) or ``"hold"`` the step-interval LR schedulers on a skipped step.
        snapshot_interval: ``"rewind"`` only: steps between snapshots (default 100).
        rewind_patience: ``"rewind"`` only: flagged steps in a row that trigger a rewind (default 3).
        max_rewinds: ``"rewind"`` only: rewinds allowed (default 3).
        lr_factor: ``"rewind"`` only: learning-rate factor per rewind, in (0, 1] (default 1.0).
        snapshot_device: ``"rewind"`` only: ``"cpu"`` (default, host memory) or ``"same"`` (the tensors' device).
        flush_interval: optimizer steps between writes (one host read each); default: ``log_every_n_steps``.
        callback_metrics: also put the flushed values into ``trainer.callback_metrics``.

    Raises:
        ValueError / TypeError: for an invalid argument, or a rewind argument without a ``"rewind"`` response.
        GradientExplosionError: during ``fit``, as described above.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> guard = ExplosionGuard(on_nonfinite="skip", on_spike="rewind", snapshot_interval=50, lr_factor=0.5)
        >>> trainer = Trainer(callbacks=[guard], logger=False, enable_progress_bar=False)
    """

    stage = 10

    def __init__(
        self,
        on_nonfinite: Response = "skip",
        on_spike: Response = "log",
        threshold: float = 6.0,
        window: int = 128,
        warmup: int = 32,
        statistic: Statistic = "median",
        detect_loss: bool = True,
        max_norm: Optional[float] = None,
        top_k: int = 5,
        max_consecutive_skips: Optional[int] = 10,
        schedule_on_skip: Literal["advance", "hold"] = "advance",
        snapshot_interval: Optional[int] = None,
        rewind_patience: Optional[int] = None,
        max_rewinds: Optional[int] = None,
        lr_factor: Optional[float] = None,
        snapshot_device: Optional[SnapshotDevice] = None,
        flush_interval: Optional[int] = None,
        callback_metrics: bool = False,
    ) -> None:
        super().__init__(flush_interval=flush_interval, callback_metrics=callback_metrics)
        for name, value in (("on_nonfinite", on_nonfinite), ("on_spike", on_spike)):
            if value not in RESPONSES:
                raise ValueError(f"Expected `{name}` to be one of {RESPONSES} but got {value!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"Expected `statistic` to be one of {STATISTICS} but got {statistic!r}")
        if schedule_on_skip not in ("advance", "hold"):
            raise ValueError(f"Expected `schedule_on_skip` to be 'advance' or 'hold' but got {schedule_on_skip!r}")
        if not isinstance(detect_loss, bool):
            raise TypeError(f"Expected `detect_loss` to be a bool but got {type(detect_loss).__name__}")
        self.threshold = _positive_number(threshold, "threshold")
        self.max_norm = None if max_norm is None else _positive_number(max_norm, "max_norm")
        self.window = check_positive_int(window, "window")
        self.warmup = check_positive_int(warmup, "warmup")
        if self.warmup > self.window:  # type: ignore[operator]
            raise ValueError(f"Expected `warmup` to be at most `window` ({window}) but got {warmup}")
        self.top_k = check_positive_int(top_k, "top_k")
        self.max_consecutive_skips = check_positive_int(max_consecutive_skips, "max_consecutive_skips", allow_none=True)
        self.on_nonfinite: Response = on_nonfinite
        self.on_spike: Response = on_spike
        self.statistic: Statistic = statistic
        self.detect_loss = detect_loss
        self.schedule_on_skip = schedule_on_skip
        self.uses_rewind = "rewind" in (on_nonfinite, on_spike)
        rewind_args = {"snapshot_interval": snapshot_interval, "rewind_patience": rewind_patience,
                       "max_rewinds": max_rewinds, "lr_factor": lr_factor, "snapshot_device": snapshot_device}
        given = [name for name, value in rewind_args.items() if value is not None]
        if given and not self.uses_rewind:
            raise ValueError(
                f"`{given[0]}` applies to the 'rewind' response only but got {given[0]}={rewind_args[given[0]]!r} with"
                f" on_nonfinite={on_nonfinite!r} and on_spike={on_spike!r}"
            )
        self.snapshot_interval = check_positive_int(snapshot_interval or 100, "snapshot_interval")
        self.rewind_patience = check_positive_int(rewind_patience or 3, "rewind_patience")
        self.max_rewinds = check_positive_int(max_rewinds or 3, "max_rewinds")
        factor = 1.0 if lr_factor is None else lr_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ValueError(f"Expected `lr_factor` to be a number in (0, 1] but got {lr_factor!r}")
        self.lr_factor = float(factor)
        if snapshot_device not in (None, "cpu", "same"):
            raise ValueError(f"Expected `snapshot_device` to be 'cpu' or 'same' but got {snapshot_device!r}")
        self.snapshot_device: SnapshotDevice = snapshot_device or "cpu"
        limit = self.max_consecutive_skips
        if self.uses_rewind and limit is not None and limit < self.rewind_patience:  # type: ignore[operator]
            raise ValueError(
                f"Expected `max_consecutive_skips` to be at least `rewind_patience` ({self.rewind_patience}) so that"
                f" a rewind can happen, but got {max_consecutive_skips}"
            )
        self.decides_on_host = any(r != "log" for r in (on_nonfinite, on_spike))
        responses = {"nonfinite": on_nonfinite, "spike": on_spike, "loss_spike": on_spike, "threshold": on_spike,
                     "scale_collapse": "log" if on_nonfinite == "log" else "raise"}
        self._responses = [responses.get(kind, "log") for kind in EVENT_KINDS]
        self._levels = torch.tensor([float(_SEVERITY[r]) for r in self._responses])

        # state that drives later decisions (checkpointed)
        self._norm_detectors: dict[int, SpikeDetector] = {}
        self._loss_detectors: dict[int, SpikeDetector] = {}
        self._counts = torch.zeros(len(EVENT_KINDS))
        self._overflows = torch.zeros((), dtype=torch.long)  # scaler skips in a row
        self._low_scale = torch.zeros((), dtype=torch.bool)  # the last step overflowed at a scale below 1
        self.skipped = 0
        self.rewinds = 0
        self.consecutive_skips = 0
        self.consecutive_flagged = 0
        self.lr_scale = 1.0
        self.next_snapshot_step = 0

        # per fit
        self.snapshot = TrainingSnapshot(self.snapshot_device)
        self._snapshot_due = True
        self._loss: Optional[Tensor] = None
        self._events: list[ExplosionEvent] = []
        self._metrics: dict[int, dict[str, float]] = {}
        self._pending_schedule: Optional[Schedule] = None
        self._limit_event: Optional[tuple[ExplosionEvent, str]] = None
        self._on_device = False
        self._hooks: list[Any] = []

    @property
    def events_path(self) -> Optional[Any]:
        """Where the JSON-lines file is written (``None`` without a logger that has a directory)."""
        return self._pipeline.events.path if self._pipeline is not None else None

    @property
    def event_counts(self) -> dict[str, int]:
        """Events per kind since training began (a host read: not for the hot path)."""
        return dict(zip(EVENT_KINDS, (int(c) for c in self._counts.tolist())))  # sync: on request only

    def _detector(self, detectors: dict[int, SpikeDetector], optimizer_idx: int) -> SpikeDetector:
        if optimizer_idx not in detectors:
            detectors[optimizer_idx] = SpikeDetector(self.window, self.threshold, self.warmup, self.statistic)
        return detectors[optimizer_idx]

    # Lightning hooks ----------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._loss, self._events, self._metrics, self._pending_schedule = None, [], {}, None
        optimizers = [torch_optimizer(o) for o in trainer.optimizers]
        foreign = [type(o).__name__ for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
        if self.decides_on_host and foreign:
            rank_zero_warn(f"ExplosionGuard skips a step by setting the gradients to None, which `torch.optim`"
                           f" optimizers honour; {foreign} may not.")
        # the sync-free skip: every optimizer takes GradScaler's device flag, and nothing needs the host
        self._on_device = (
            self.decides_on_host
            and {self.on_nonfinite, self.on_spike} <= {"log", "skip"}
            and self.schedule_on_skip == "advance"
            and grad_scaler(trainer) is None
            and self.pipeline.communication is None  # its error feedback is undone on the host for a skipped step
            and all(takes_found_inf(o) for o in optimizers)
        )
        for optimizer in optimizers:  # the rewinds' learning-rate factor, applied inside every optimizer step
            if self.uses_rewind:
                self._hooks += [optimizer.register_step_pre_hook(self._scale_lr),
                                optimizer.register_step_post_hook(self._unscale_lr)]
            if self._on_device:
                self._hooks.append(optimizer.register_step_post_hook(_clear_found_inf))

    def _scale_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        if self.lr_scale != 1.0:
            for group in optimizer.param_groups:
                group[STEP_LR] = group["lr"]
                group["lr"] = group["lr"] * self.lr_scale

    def _unscale_lr(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        for group in optimizer.param_groups:
            if STEP_LR in group:
                group["lr"] = group.pop(STEP_LR)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # after the previous batch's scheduler steps: put back the schedule of a rewind or a held skip
        if self._pending_schedule is not None:
            self._pending_schedule.restore(*self._optimizers_and_schedulers(trainer))
            self._pending_schedule = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._remove_hooks()
        rank_zero_info(f"ExplosionGuard summary\n{self.summary()}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._remove_hooks()
        if isinstance(exception, GradientExplosionError):
            rank_zero_info(f"ExplosionGuard summary\n{self.summary()}")

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Keep the loss of the coming optimizer step on the device (summed over accumulated micro-batches)."""
        if not self.detect_loss:
            return
        loss = loss.detach().float()
        scaler = grad_scaler(trainer)
        scale = loss_scale(scaler) if scaler is not None else None
        if scale is not None:  # 16-mixed: the hook sees the scaled loss
            loss = loss / scale.to(loss.device).reshape(())
        self._loss = loss if self._loss is None else self._loss + loss

    # the step -------------------------------------------------------------------------------------------------------
    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        device, norm, idx = step.device, step.total, step.optimizer_idx
        false = torch.zeros((), dtype=torch.bool, device=device)
        loss, origin, loss_fault = self._take_loss(trainer, device)
        if loss is None:  # no backward seen (``detect_loss=False``): nothing to check, no statistics to update
            nan = torch.full((), math.nan, device=device)
            loss, loss_nonfinite, loss_check = nan, false, SpikeCheck(false, nan, nan, nan)
        else:
            loss_nonfinite, loss_check = ~torch.isfinite(loss), self._detector(self._loss_detectors, idx).update(loss)
        scaler = grad_scaler(trainer)
        overflow = found_inf(scaler, step.optimizer, device) if scaler is not None else false
        # an overflow the grad scaler caught is not an explosion (it skips the step itself); a NaN loss is
        nonfinite = (~step.finite & ~overflow) | loss_nonfinite
        norm_check = self._detector(self._norm_detectors, idx).update(norm)
        over_max = false if self.max_norm is None else norm > self.max_norm
        spikes = torch.stack([norm_check.flag, loss_check.flag, over_max]) & ~nonfinite
        # overflows a non-finite loss explains say nothing about the scale
        collapse = self._scale_collapse(scaler, overflow & ~loss_nonfinite) if scaler is not None else false
        flags = torch.cat([nonfinite.reshape(1), spikes, overflow.reshape(1), collapse.reshape(1), false.reshape(1)])
        # a rank's own fault names it: its loss went non-finite (known from the per-rank losses), else its gradients
        flags, origin = self._across_ranks(trainer, flags.float(), origin, ~step.local_finite & ~loss_fault & ~overflow)
        if step.nonfinite_ranks is not None:  # compressed communication saw each rank's gradients before the reduction
            first = torch.argmax(step.nonfinite_ranks.float()).float()
            origin = torch.where(step.nonfinite_ranks.any() & ~loss_fault, first, origin)
        self._counts = to_device(self._counts, device) + flags
        top_idx, top_norms = top_layers(step.per_tensor, self.top_k)
        scalars = [norm, loss, norm_check.baseline, norm_check.zscore, loss_check.baseline, loss_check.zscore, origin]
        values = torch.cat([flags, torch.stack(scalars).float(), self._counts, top_idx.float(), top_norms])
        if not self.decides_on_host:
            self._record(trainer, step, values, None)
        elif self._on_device:
            self._skip_on_device(trainer, step, flags, values)
        else:
            self._respond(trainer, pl_module, step, flags, values)

    def _take_loss(self, trainer: pl.Trainer, device: torch.device) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """The loss of this step averaged over ranks; the rank it most likely went wrong on (the first with a
        non-finite loss, else the one with the largest); whether some rank's own loss was non-finite. On the device."""
        loss, self._loss = self._loss, None
        rank = torch.full((), float(trainer.global_rank), device=device)
        if loss is None:
            return None, rank, torch.zeros((), dtype=torch.bool, device=device)
        loss = loss.to(device).reshape(())
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            per_rank = torch.zeros(trainer.world_size, device=device)
            per_rank[trainer.global_rank] = loss
            dist.all_reduce(per_rank)  # every rank gets every rank's loss: one collective, no host read
            loss = per_rank.mean()
            rank = torch.argmax(torch.nan_to_num(per_rank, nan=math.inf)).float()
        return loss, rank, ~torch.isfinite(loss)

    def _scale_collapse(self, scaler: torch.amp.GradScaler, overflow: Tensor) -> Tensor:
        """Device bool, set once per collapse: the scaler skipped ``max_consecutive_skips`` steps in a row, or the
        loss scale of an overflowing step fell below 1."""
        self._overflows = torch.where(overflow, to_device(self._overflows, overflow.device) + 1, 0)
        scale = loss_scale(scaler)
        low = torch.zeros_like(overflow) if scale is None else overflow & (scale.to(overflow.device).reshape(()) < 1)
        first_low, self._low_scale = low & ~to_device(self._low_scale, low.device), low
        if self.max_consecutive_skips is None:
            return first_low
        return first_low | (self._overflows == self.max_consecutive_skips)

    def _across_ranks(self, trainer: pl.Trainer, flags: Tensor, origin: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's flags (MAX). The origin is the loss's when a rank's own loss was non-finite, else the first
        rank whose own gradients were (a fault after the gradient reduction), else the loss's."""
        if not (trainer.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return flags, origin
        world, rank = trainer.world_size, trainer.global_rank
        mine = torch.where(own, float(world - rank), 0.0).reshape(1)
        combined = torch.cat([flags, mine])
        dist.all_reduce(combined, op=dist.ReduceOp.MAX)  # one collective, no host read
        first = combined[-1]
        return combined[:-1], torch.where(first > 0, world - first, origin)

    def _severity(self, flags: Tensor) -> Tensor:
        if self._levels.device != flags.device:
            self._levels = to_device(self._levels, flags.device)
        return (flags * self._levels).amax()

    def _skip_on_device(self, trainer: pl.Trainer, step: GradStep, flags: Tensor, values: Tensor) -> None:
        """Skip through the optimizer's own device flag (GradScaler's ``found_inf``): no host read."""
        skip = self._severity(flags) > 0
        step.optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        step.finite = step.finite & ~skip  # the later stages leave a skipped step out of their statistics
        self._record(trainer, step, torch.cat([values, skip.float().reshape(1)]), "device")

    def _respond(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep, flags: Tensor,
                 values: Tensor) -> None:
        code = self._severity(flags) * 2 + flags.amax()  # odd when any event (logged ones included) happened
        # the one host read per step, taken only because a "skip"/"raise"/"rewind" response is enabled
        level, any_event = divmod(int(code.item()), 2)  # sync: opt-in host decision
        if self.uses_rewind and (self._snapshot_due or (level == 0 and not any_event and
                                                        step.global_step >= self.next_snapshot_step)):
            self._take_snapshot(trainer, pl_module, step.global_step)
        if level == 0:
            self.consecutive_skips = self.consecutive_flagged = 0
            self._record(trainer, step, values, None)
            return
        if level == _SEVERITY["raise"]:
            self._stop(trainer, step, values, "raised")
        self.consecutive_flagged = self.consecutive_flagged + 1 if level == _SEVERITY["rewind"] else 0
        step.drop_gradients()
        self.skipped += 1
        self.consecutive_skips += 1
        action = "skipped"
        if self.consecutive_flagged >= self.rewind_patience:
            self._rewind(trainer, pl_module, step, values)
            step.rewound, action = True, "rewound"
        elif self.schedule_on_skip == "hold":
            self._pending_schedule = Schedule(*self._optimizers_and_schedulers(trainer))
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            self._stop(trainer, step, values, "raised", f"{self.consecutive_skips} steps in a row were skipped"
                                                         f" (max_consecutive_skips={limit})")
        self._record(trainer, step, values, action)

    def _optimizers_and_schedulers(self, trainer: pl.Trainer) -> tuple[list, list]:
        return [torch_optimizer(o) for o in trainer.optimizers], [c.scheduler for c in trainer.lr_scheduler_configs]

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self.snapshot.capture(pl_module, *self._optimizers_and_schedulers(trainer), step)
        self.next_snapshot_step = (step // self.snapshot_interval + 1) * self.snapshot_interval
        self._snapshot_due = False

    def _rewind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep, values: Tensor) -> None:
        if self.rewinds >= self.max_rewinds:
            self._stop(trainer, step, values, "raised", f"{self.rewinds} rewinds did not help"
                                                        f" (max_rewinds={self.max_rewinds})")
        optimizers, _ = self._optimizers_and_schedulers(trainer)
        self.snapshot.restore_state(pl_module, optimizers)
        # the schedule goes back after Lightning has stepped the schedulers for this (skipped) step
        self._pending_schedule = self.snapshot.schedule
        self.lr_scale *= self.lr_factor
        self.rewinds += 1
        self.consecutive_skips = self.consecutive_flagged = 0

    def _stop(
        self, trainer: pl.Trainer, step: GradStep, values: Tensor, action: str, reason: Optional[str] = None
    ) -> None:
        """Write the events of this step, then raise :class:`GradientExplosionError` on every rank."""
        self._record(trainer, step, values, action)
        self.pipeline.flush(trainer)
        host = values.tolist()  # sync: training stops here anyway
        where = self._where(trainer, step)
        events = self._events_of(where, host, action) or [self._event(where, host, "nonfinite", action)]
        # the event that asked for the raise, else (a limit was reached) the first that was answered
        raising = [e for e in events if self._responses[_KIND[e.kind]] == "raise"] if reason is None else []
        raise self._error((raising or [e for e in events if e.kind != "overflow"] or events)[0], reason)

    def _error(self, event: ExplosionEvent, reason: Optional[str]) -> GradientExplosionError:
        layers = ", ".join(f"{name} ({norm:.4g})" for name, norm in event.top_layers[:3])
        if reason is None:
            option = "on_spike" if event.kind in ("spike", "loss_spike", "threshold") else "on_nonfinite"
            reason = f"{_DESCRIPTIONS[event.kind]} ({option}={self._responses[_KIND[event.kind]]!r})"
        return GradientExplosionError(
            f"ExplosionGuard stopped training at step {event.step} (epoch {event.epoch}): {reason}."
            f" Event: {event.kind}, gradient norm {event.grad_norm:.4g} (baseline {event.baseline:.4g},"
            f" z-score {event.zscore:.4g}), loss {event.loss:.4g}. Worst layers: {layers}."
            f" What to try next: {_HINTS.get(event.kind, _HINTS['spike'])}",
            event,
        )

    # reporting ----------------------------------------------------------------------------------------------------
    def _where(self, trainer: pl.Trainer, step: GradStep) -> _Where:
        return _Where(step.step, step.global_step, trainer.current_epoch, step.optimizer_idx, step.names)

    def _record(self, trainer: pl.Trainer, step: GradStep, values: Tensor, action: Optional[str]) -> None:
        """Queue this step's values for the flush; the sink turns flags into events (rank 0, or every rank when
        skips are counted at the flush)."""
        if not trainer.is_global_zero and action != "device":
            return
        where, totals = self._where(trainer, step), (self.skipped, self.rewinds)

        def sink(step_number: int, host: list) -> None:
            done, (skipped, rewinds) = action, totals
            if action == "device":  # the skip decided on the device, read now
                done = "skipped" if host[-1] > 0 else None
                self._count_device_skip(done is not None, where, host)
                skipped = self.skipped
            events = self._events_of(where, host, done)
            self._events.extend(events)
            counts = host[len(EVENT_KINDS) + 7 : 2 * len(EVENT_KINDS) + 7]
            row = {f"{TAG_PREFIX}/events/{e.kind}": counts[_KIND[e.kind]] for e in events}
            if done in ("skipped", "rewound", "raised"):
                row[f"{TAG_PREFIX}/guard/skipped"] = float(skipped)
            if done == "rewound":
                row[f"{TAG_PREFIX}/guard/rewinds"] = float(rewinds)
            if row and trainer.is_global_zero:
                self._metrics[step_number] = row

        self.pipeline.buffer.add_custom(step.step, values, sink)

    def _count_device_skip(self, skipped: bool, where: _Where, host: list) -> None:
        self.skipped += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit and self._limit_event is None:
            event = next(iter(self._events_of(where, host, "raised")))
            self._limit_event = (event, f"{self.consecutive_skips} steps in a row were skipped"
                                        f" (max_consecutive_skips={limit})")

    def _events_of(self, where: _Where, host: list, action: Optional[str]) -> list[ExplosionEvent]:
        events = []
        for kind, flagged, response in zip(EVENT_KINDS, host[: len(EVENT_KINDS)], self._responses):
            if flagged:  # what was done: the scaler skipped an overflow; a logged kind; else the step's action
                logged = response == "log" or action is None
                done = "scaler_skipped" if kind == "overflow" else "logged" if logged else action
                events.append(self._event(where, host, kind, done))  # type: ignore[arg-type]
        return events

    def _event(self, where: _Where, host: list, kind: str, action: str) -> ExplosionEvent:
        n = len(EVENT_KINDS)
        norm, loss, norm_base, norm_z, loss_base, loss_z, origin = host[n : n + 7]
        k = min(self.top_k, len(where.names))
        top = host[2 * n + 7 : 2 * n + 7 + 2 * k]
        layers = [(where.names[int(i)], value) for i, value in zip(top[:k], top[k:])]
        baseline, zscore = (loss_base, loss_z) if kind == "loss_spike" else (norm_base, norm_z)
        return ExplosionEvent(where.step, where.epoch, kind, norm, loss, baseline, zscore, action, layers,
                              rank=int(origin), optimizer=where.optimizer_idx, global_step=where.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._limit_event is not None:  # skips counted at this flush reached the limit (the device path)
            (event, reason), self._limit_event = self._limit_event, None
            self.pipeline.events.write([event])
            raise self._error(event, reason)

    @override
    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> list[ExplosionEvent]:
        events, self._events = self._events, []
        metrics, self._metrics = self._metrics, {}
        for step, row in metrics.items():
            result.metrics.setdefault(step, {}).update(row)
        return events

    def summary(self) -> str:
        """The end-of-fit table: events of this fit per kind and action, skipped steps and rewinds."""
        text = summary_table(self.pipeline.events.tally, skipped=self.skipped, rewinds=self.rewinds)
        if self.snapshot.taken:
            text += (
                f"\nrewind snapshot: {self.snapshot.nbytes / 2**20:.2f} MiB on {self.snapshot_device},"
                f" last taken at step {self.snapshot.step} in {self.snapshot.seconds * 1e3:.2f} ms"
            )
        return text

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"events": [rf"{TAG_PREFIX}/events/.*", rf"{TAG_PREFIX}/guard/.*"]}

    # checkpointing ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # at checkpoint time only: the device tensors are copied to the CPU (a host sync)
        return {
            "norm_windows": {i: _on_cpu(d.state_dict()) for i, d in self._norm_detectors.items()},
            "loss_windows": {i: _on_cpu(d.state_dict()) for i, d in self._loss_detectors.items()},
            "counts": self._counts.to("cpu", copy=True),
            "overflows": self._overflows.to("cpu", copy=True),
            "skipped": self.skipped,
            "rewinds": self.rewinds,
            "consecutive_skips": self.consecutive_skips,
            "consecutive_flagged": self.consecutive_flagged,
            "lr_scale": self.lr_scale,
            "next_snapshot_step": self.next_snapshot_step,
            "window": self.window,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_window = state_dict.get("window", self.window)
        if saved_window != self.window:
            rank_zero_warn(f"ExplosionGuard: `window` was {saved_window} in the checkpoint and is {self.window} now;"
                           " the running statistics keep their most recent values")
        for key, detectors in (("norm_windows", self._norm_detectors), ("loss_windows", self._loss_detectors)):
            detectors.clear()
            for i, window in state_dict.get(key, {}).items():
                self._detector(detectors, int(i)).load_state_dict(window)
        if "loss_window" in state_dict:  # one loss window for every optimizer, as older checkpoints have it
            self._detector(self._loss_detectors, 0).load_state_dict(state_dict["loss_window"])
        counts = torch.as_tensor(state_dict.get("counts", torch.zeros(len(EVENT_KINDS))), dtype=torch.float32)
        self._counts = torch.cat([counts, torch.zeros(len(EVENT_KINDS) - counts.numel())])
        self._overflows = torch.as_tensor(state_dict.get("overflows", 0), dtype=torch.long).clone()
        self.skipped = int(state_dict.get("skipped", 0))
        self.rewinds = int(state_dict.get("rewinds", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.consecutive_flagged = int(state_dict.get("consecutive_flagged", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.next_snapshot_step = int(state_dict.get("next_snapshot_step", 0))
        self._snapshot_due = True  # the snapshot lives in memory only: the resumed state is the next one


def _clear_found_inf(optimizer: torch.optim.Optimizer, *args: Any) -> None:
    optimizer.__dict__.pop("found_inf", None)


def _on_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.to("cpu", copy=True) for key, value in state.items()}


def _positive_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite number but got {value!r}")
    return float(value)
