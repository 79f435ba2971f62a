"""ExplosionGuard: detect explosion events at every optimizer step, answer them, and report them."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard.callbacks._rewind import SnapshotDevice, TrainingSnapshot
from lightning_gradguard.callbacks._runtime import TAG_PREFIX, GradStep, get_runtime, unwrap_optimizer
from lightning_gradguard.callbacks.base import STAGE_GUARD, GradGuardCallback, check_positive_int
from lightning_gradguard.events import EVENT_KINDS, ExplosionEvent, append_jsonl, summary_table
from lightning_gradguard.functional.detection import STATISTICS, SpikeCheck, SpikeDetector, Statistic, top_layers
from lightning_gradguard.logging.buffer import FlushResult
from lightning_gradguard.logging.tensorboard import write_text
from lightning_gradguard.utilities import device_tensor, to_device

__all__ = ["ExplosionGuard", "GradientExplosionError"]

Response = Literal["log", "skip", "raise", "rewind"]
RESPONSES = ("log", "skip", "raise", "rewind")
# the response a step gets is the most severe one among its events; the value is what ranks agree on (MAX)
_SEVERITY = {"log": 0, "skip": 1, "rewind": 2, "raise": 3}
EVENTS_FILE = "gradguard_events.jsonl"
TEXT_TAG = f"{TAG_PREFIX}/events"

_OVERFLOW = EVENT_KINDS.index("overflow")
_DESCRIPTIONS = {
    "nonfinite": "non-finite gradients or loss",
    "spike": "a gradient-norm spike",
    "loss_spike": "a loss spike",
    "threshold": "the gradient norm crossed `max_norm`",
    "overflow": "an AMP overflow",
}
_HINTS = {
    "nonfinite": "find the batch or operation that produced NaN/Inf (log of 0, division by zero, an fp16 overflow:"
    " try precision='bf16-mixed'; torch.autograd.set_detect_anomaly(True) names the operation), lower the learning"
    " rate, or use on_nonfinite='skip' to step over isolated bad batches.",
    "spike": "lower the learning rate or add warm-up, attach GradientClipping (method='zscore' or 'quantile'),"
    " check the data around this step, or use on_spike='skip' / 'rewind' to ride spikes out.",
}


class GradientExplosionError(RuntimeError):
    """Raised by :class:`ExplosionGuard` to stop ``fit``. ``event`` is the event that triggered it and ``report``
    its markdown report (also written to TensorBoard and to ``gradguard_events.jsonl`` before the raise)."""

    def __init__(self, message: str, event: ExplosionEvent) -> None:
        super().__init__(message)
        self.event = event
        self.report = event.to_markdown()


@dataclass
class _Outcome:
    """What the host decided about one step (read by the flush-time sink)."""

    action: Optional[str] = None  # "skipped" | "rewound" | "raised", None when nothing was done
    skipped: Optional[int] = None  # running totals, set on the steps where they changed
    rewinds: Optional[int] = None


class _StepValues:
    """The per-step device vector the sink reads back at the flush: layout in one place."""

    FLAGS = slice(0, len(EVENT_KINDS))
    NORM, LOSS, NORM_BASE, NORM_Z, LOSS_BASE, LOSS_Z, ORIGIN = range(len(EVENT_KINDS), len(EVENT_KINDS) + 7)
    COUNTS = slice(len(EVENT_KINDS) + 7, 2 * len(EVENT_KINDS) + 7)
    TOP = 2 * len(EVENT_KINDS) + 7

    @classmethod
    def pack(cls, flags: Tensor, scalars: list[Tensor], counts: Tensor, top_idx: Tensor, top_norms: Tensor) -> Tensor:
        return torch.cat([flags, torch.stack(scalars).float(), counts, top_idx.float(), top_norms])


class ExplosionGuard(GradGuardCallback):
    r"""Detect explosion events at every optimizer step, answer them (log, skip, raise, rewind) and report them.

    Detection, on the device at every optimizer step (after gradient accumulation and AMP unscaling, before any
    clipping: with :class:`~lightning_gradguard.GradientClipping` attached the guard sees the pre-clip norm, and
    both use the one norm computation of the step):

    - ``nonfinite``: the global gradient norm is NaN/Inf (any parameter; under DDP gradients are averaged and under
      FSDP2 the norm is reduced, so a NaN on one rank is seen by all) or the loss is (seen in
      ``on_before_backward``, averaged over ranks).
    - ``spike`` / ``loss_spike``: the gradient norm / the loss is more than ``threshold`` spreads above its running
      baseline over the last ``window`` finite values (median and MAD, or mean and std:
      :class:`~lightning_gradguard.functional.detection.SpikeDetector`); nothing is flagged during the first
      ``warmup`` values, non-finite values never enter the statistics.
    - ``threshold``: the gradient norm exceeds ``max_norm`` (when given).
    - ``overflow``: with ``precision="16-mixed"`` the grad scaler found Inf/NaN; the scaler skips that step itself,
      so the guard only records it (no ``nonfinite`` event, no second skip).

    Responses, chosen per kind (``on_nonfinite``; ``on_spike`` covers ``spike``, ``loss_spike`` and ``threshold``):

    - ``"log"``: record only. Sync-free: the flags stay on the device and the events are written at the next flush
      with their true step numbers.
    - ``"skip"``: the step changes nothing: all gradients are set to ``None`` and ``torch.optim`` optimizers leave
      parameters and state (moments, step counts, weight decay) untouched. Training goes on; after
      ``max_consecutive_skips`` skipped steps in a row, :class:`GradientExplosionError` is raised.
    - ``"raise"``: stop ``fit`` with :class:`GradientExplosionError` naming the step, the norm, the worst layers and
      what to try next; the events are written first.
    - ``"rewind"``: every ``snapshot_interval`` steps (at the first healthy step at or after each multiple) a copy
      of the model, optimizer and LR-scheduler state is kept in memory (``snapshot_device``: ``"cpu"`` or
      ``"same"`` device; under FSDP2 each rank copies its local shards). A flagged step is skipped; after
      ``rewind_patience`` flagged steps in a row the snapshot is restored, learning rates are multiplied by
      ``lr_factor``, and training goes on with the next batches (``global_step`` keeps counting). The
      ``max_rewinds + 1``-th rewind raises :class:`GradientExplosionError` instead. After a checkpoint resume the
      first healthy step takes a snapshot. The memory it holds is ``snapshot_nbytes``.

    Cost: ``"log"`` alone never reads a device value on the hot path. ``"skip"``, ``"raise"`` and ``"rewind"`` need a
    host decision: **one scalar read per optimizer step**, only when one of them is enabled. To make every rank take
    the same decision the scalar is all-reduced (MAX) before the read; under several processes the loss is also
    all-reduced once per step (a collective, not a host read).

    Reporting (only rank 0 writes):

    - ``<log_dir>/gradguard_events.jsonl`` (``log_dir`` of the first logger that has one, else the Trainer's
      ``default_root_dir``): one JSON object per :class:`~lightning_gradguard.events.ExplosionEvent`, appended
      and flushed at each flush.
    - ``gradguard/events`` (TensorBoard text): one markdown report per event, with a table of the ``top_k`` layers.
    - ``gradguard/events/<kind>``: running count of events of that kind, at the steps where it changes.
    - ``gradguard/guard/skipped``, ``gradguard/guard/rewinds``: running totals, at the steps where they change.
    - An "events" chart in the custom-scalars layout, and a summary table at the end of ``fit``.

    Args:
        on_nonfinite: response to non-finite gradients or loss.
        on_spike: response to gradient-norm spikes, loss spikes and ``max_norm`` crossings.
        threshold: z-score above which a value is a spike.
        window: number of recent finite values the running statistics cover.
        warmup: values needed in the window before spikes are flagged (at most ``window``).
        statistic: ``"median"`` (median and MAD, robust to the spikes themselves) or ``"mean"`` (mean and std).
        detect_loss: also watch the loss (non-finite and spikes); the loss is read in ``on_before_backward``.
        max_norm: absolute gradient-norm limit (``threshold`` events), or ``None``.
        top_k: number of layers named in each event.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never).
        snapshot_interval: optimizer steps between two rewind snapshots.
        rewind_patience: flagged steps in a row (each one skipped) that trigger a rewind.
        max_rewinds: rewinds allowed before giving up.
        lr_factor: learning rates (and LR-scheduler base rates) are multiplied by this at each rewind; in (0, 1].
        snapshot_device: ``"cpu"`` (host memory) or ``"same"`` (the device of each tensor).
        flush_interval: optimizer steps between writes (one host read each); default: ``log_every_n_steps``.

    Raises:
        ValueError: for an unknown response, statistic or snapshot device, a non-positive number, ``warmup >
            window``, ``lr_factor`` outside (0, 1], or ``max_consecutive_skips < rewind_patience`` with rewinds.
        GradientExplosionError: during ``fit``, as described above.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> guard = ExplosionGuard(on_nonfinite="skip", on_spike="rewind", snapshot_interval=50, lr_factor=0.5)
        >>> trainer = Trainer(callbacks=[guard], logger=False, enable_progress_bar=False)
    """

    stage = STAGE_GUARD

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
        snapshot_interval: int = 100,
        rewind_patience: int = 3,
        max_rewinds: int = 3,
        lr_factor: float = 1.0,
        snapshot_device: SnapshotDevice = "cpu",
        flush_interval: Optional[int] = None,
    ) -> None:
        super().__init__(flush_interval=flush_interval)
        for name, value in (("on_nonfinite", on_nonfinite), ("on_spike", on_spike)):
            if value not in RESPONSES:
                raise ValueError(f"Expected `{name}` to be one of {RESPONSES} but got {value!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"Expected `statistic` to be one of {STATISTICS} but got {statistic!r}")
        if snapshot_device not in ("cpu", "same"):
            raise ValueError(f"Expected `snapshot_device` to be 'cpu' or 'same' but got {snapshot_device!r}")
        _check_positive_number(threshold, "threshold")
        if max_norm is not None:
            _check_positive_number(max_norm, "max_norm")
        if not isinstance(lr_factor, (int, float)) or isinstance(lr_factor, bool) or not 0 < lr_factor <= 1:
            raise ValueError(f"Expected `lr_factor` to be a number in (0, 1] but got {lr_factor!r}")
        if not isinstance(detect_loss, bool):
            raise TypeError(f"Expected `detect_loss` to be a bool but got {type(detect_loss).__name__}")
        self.window = check_positive_int(window, "window")
        self.warmup = check_positive_int(warmup, "warmup")
        if self.warmup > self.window:
            raise ValueError(f"Expected `warmup` to be at most `window` ({window}) but got {warmup}")
        self.top_k = check_positive_int(top_k, "top_k")
        self.max_consecutive_skips = check_positive_int(
            max_consecutive_skips, "max_consecutive_skips", allow_none=True
        )
        self.snapshot_interval = check_positive_int(snapshot_interval, "snapshot_interval")
        self.rewind_patience = check_positive_int(rewind_patience, "rewind_patience")
        self.max_rewinds = check_positive_int(max_rewinds, "max_rewinds")
        self.on_nonfinite: Response = on_nonfinite
        self.on_spike: Response = on_spike
        self.uses_rewind = "rewind" in (on_nonfinite, on_spike)
        skip_limit = self.max_consecutive_skips
        if self.uses_rewind and skip_limit is not None and skip_limit < rewind_patience:
            raise ValueError(
                f"Expected `max_consecutive_skips` to be at least `rewind_patience` ({rewind_patience}) so that a"
                f" rewind can happen, but got {max_consecutive_skips}"
            )
        self.threshold = float(threshold)  # a Python number: no sync
        self.statistic: Statistic = statistic
        self.detect_loss = detect_loss
        self.max_norm = None if max_norm is None else float(max_norm)  # a Python number: no sync
        self.lr_factor = float(lr_factor)
        self.snapshot_device: SnapshotDevice = snapshot_device
        # "skip"/"raise"/"rewind" need the flag on the host: one scalar read per step
        self.decides_on_host = any(r != "log" for r in (on_nonfinite, on_spike))
        self._responses = {
            "nonfinite": on_nonfinite,
            "spike": on_spike,
            "loss_spike": on_spike,
            "threshold": on_spike,
            "overflow": "log",
        }
        self._severity_by_device: dict[torch.device, Tensor] = {}

        # state that drives later decisions (checkpointed)
        self._norm_detectors: dict[int, SpikeDetector] = {}
        self._loss_detector = self._new_detector()
        self._counts = torch.zeros(len(EVENT_KINDS))
        self.skipped = 0
        self.rewinds = 0
        self.consecutive_skips = 0
        self.consecutive_flagged = 0
        self.lr_scale = 1.0
        self.next_snapshot_step = 0

        # per fit, not checkpointed
        self.snapshot = TrainingSnapshot(snapshot_device)
        self.tally: Counter = Counter()
        self._loss: Optional[Tensor] = None
        self._pending_events: list[ExplosionEvent] = []
        self._pending_metrics: dict[int, dict[str, float]] = {}
        self._events_path: Optional[Path] = None

    # ------------------------------------------------------------------------------------------------------------
    @property
    def events_path(self) -> Optional[Path]:
        """Where the JSON-lines file is written (set on rank 0 at the first write)."""
        return self._events_path

    @property
    def event_counts(self) -> dict[str, int]:
        """Events per kind since training began (a host read: not for the hot path)."""
        return dict(zip(EVENT_KINDS, (int(c) for c in self._counts.tolist())))  # sync: on request only

    @property
    def snapshot_nbytes(self) -> int:
        return self.snapshot.nbytes

    def _new_detector(self) -> SpikeDetector:
        return SpikeDetector(self.window, self.threshold, self.warmup, self.statistic)

    # Lightning hooks ----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.tally = Counter()
        self._loss = None
        self._events_path = None
        # optimizers exist from here on (not yet in ``setup``)
        optimizers, _ = self._optimizers_and_schedulers(trainer)
        foreign = [type(o).__name__ for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
        if self.decides_on_host and foreign:
            rank_zero_warn(
                f"ExplosionGuard skips a step by setting the gradients to None, which `torch.optim` optimizers honour;"
                f" {foreign} may not."
            )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Keep the loss of this optimizer step on the device (summed over accumulated micro-batches)."""
        if not self.detect_loss:
            return
        loss = loss.detach().float()
        scaler = _grad_scaler(trainer)
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, Tensor):  # 16-mixed: the hook sees the scaled loss
            loss = loss / scale.to(loss.device).reshape(())
        self._loss = loss if self._loss is None else self._loss + loss

    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        device, norm = step.device, step.total_norm
        false = torch.zeros((), dtype=torch.bool, device=device)
        loss, origin = self._take_loss(trainer, device)
        if loss is None:  # no backward seen (``detect_loss=False``): nothing to check, no statistics to update
            nan = torch.full((), math.nan, device=device)
            loss, loss_nonfinite, loss_check = nan, false, SpikeCheck(false, nan, nan, nan)
        else:
            loss_nonfinite, loss_check = ~torch.isfinite(loss), self._loss_detector.update(loss)
        found_inf = _scaler_found_inf(trainer, step.optimizer, device)
        # an overflow the grad scaler caught is not an explosion (the scaler skips the step itself); a NaN loss is
        nonfinite = (step.nonfinite & ~found_inf) | loss_nonfinite
        norm_check = self._norm_detector(step.optimizer_idx).update(norm)
        over_max = false if self.max_norm is None else norm > self.max_norm
        spikes = torch.stack([norm_check.flag, loss_check.flag, over_max]) & ~nonfinite
        flags = torch.cat([nonfinite.reshape(1), spikes, found_inf.reshape(1)]).float()  # in EVENT_KINDS order
        self._counts = to_device(self._counts, device) + flags
        top_idx, top_norms = top_layers(step.per_tensor_norms, self.top_k)
        scalars = [norm, loss, norm_check.baseline, norm_check.zscore, loss_check.baseline, loss_check.zscore, origin]
        values = _StepValues.pack(flags, scalars, self._counts, top_idx, top_norms)
        outcome = _Outcome()
        if self.decides_on_host:
            self._respond(trainer, pl_module, step, flags, found_inf, values, outcome)
        else:
            self._record(trainer, step, values, outcome)

    def _norm_detector(self, optimizer_idx: int) -> SpikeDetector:
        if optimizer_idx not in self._norm_detectors:
            self._norm_detectors[optimizer_idx] = self._new_detector()
        return self._norm_detectors[optimizer_idx]

    def _take_loss(self, trainer: pl.Trainer, device: torch.device) -> tuple[Optional[Tensor], Tensor]:
        """The loss of this step averaged over ranks, and the rank it most likely went wrong on (the first with a
        non-finite loss, else the one with the largest), both on the device."""
        loss, self._loss = self._loss, None
        rank = torch.full((), float(trainer.global_rank), device=device)
        if loss is None:
            return None, rank
        loss = loss.to(device).reshape(())
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            per_rank = torch.zeros(trainer.world_size, device=device)
            per_rank[trainer.global_rank] = loss
            dist.all_reduce(per_rank)  # every rank gets every rank's loss: one collective, no host read
            loss = per_rank.mean()
            rank = torch.argmax(torch.nan_to_num(per_rank, nan=math.inf)).float()
        return loss, rank

    def _respond(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: GradStep,
        flags: Tensor,
        found_inf: Tensor,
        values: Tensor,
        outcome: _Outcome,
    ) -> None:
        severity = (flags * self._severity(flags.device)).amax()
        # when the grad scaler found an overflow it skips the step itself: do not skip (or rewind) a second time
        severity = torch.where(found_inf & (severity < _SEVERITY["raise"]), 0.0, severity)
        code = severity * 2 + flags.amax()  # odd when any event (logged ones included) happened on this step
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MAX)  # every rank takes the most severe response of any rank
        # the one host read per step, taken only because a "skip"/"raise"/"rewind" response is enabled
        severity_level, any_event = divmod(int(code.item()), 2)  # sync: opt-in host decision

        if severity_level == 0:
            self.consecutive_skips = self.consecutive_flagged = 0
            if self.uses_rewind and not any_event and step.step >= self.next_snapshot_step:
                self._take_snapshot(trainer, pl_module, step.step)
            self._record(trainer, step, values, outcome)
            return
        if severity_level == _SEVERITY["raise"]:
            self._stop(trainer, step, values, outcome)
        self.consecutive_flagged = self.consecutive_flagged + 1 if severity_level == _SEVERITY["rewind"] else 0
        step.drop_gradients()
        self.skipped += 1
        self.consecutive_skips += 1
        outcome.action, outcome.skipped = "skipped", self.skipped
        if self.consecutive_flagged >= self.rewind_patience:
            self._rewind(trainer, pl_module, step, values, outcome)
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            reason = f"{self.consecutive_skips} steps in a row were skipped (max_consecutive_skips={limit})"
            self._stop(trainer, step, values, outcome, reason=reason)
        self._record(trainer, step, values, outcome)

    def _severity(self, device: torch.device) -> Tensor:
        severity = self._severity_by_device.get(device)
        if severity is None:
            levels = [float(_SEVERITY[self._responses[kind]]) for kind in EVENT_KINDS]
            severity = self._severity_by_device[device] = device_tensor(levels, device=device)
        return severity

    def _optimizers_and_schedulers(self, trainer: pl.Trainer) -> tuple[list, list]:
        return [unwrap_optimizer(o) for o in trainer.optimizers], [c.scheduler for c in trainer.lr_scheduler_configs]

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        optimizers, schedulers = self._optimizers_and_schedulers(trainer)
        self.snapshot.capture(pl_module, optimizers, schedulers, step, self.lr_scale)
        self.next_snapshot_step = (step // self.snapshot_interval + 1) * self.snapshot_interval

    def _rewind(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep, values: Tensor, outcome: _Outcome
    ) -> None:
        if not self.snapshot.taken:
            self._stop(trainer, step, values, outcome, reason="a rewind was due but no healthy snapshot exists yet")
        if self.rewinds >= self.max_rewinds:
            reason = f"{self.rewinds} rewinds did not help (max_rewinds={self.max_rewinds})"
            self._stop(trainer, step, values, outcome, reason=reason)
        optimizers, schedulers = self._optimizers_and_schedulers(trainer)
        # learning rates go back to the snapshot's, then down to the scale in force after this rewind
        factor = self.lr_scale * self.lr_factor / self.snapshot.lr_scale
        self.snapshot.restore(pl_module, optimizers, schedulers, lr_factor=factor)
        self.lr_scale *= self.lr_factor
        self.rewinds += 1
        self.consecutive_skips = self.consecutive_flagged = 0
        outcome.action, outcome.rewinds = "rewound", self.rewinds

    def _stop(
        self, trainer: pl.Trainer, step: GradStep, values: Tensor, outcome: _Outcome, reason: Optional[str] = None
    ) -> None:
        """Write the events of this step, then raise :class:`GradientExplosionError` on every rank."""
        outcome.action = "raised"
        self._record(trainer, step, values, outcome)
        get_runtime(trainer).flush(trainer)
        host = values.tolist()  # sync: training stops here anyway
        events = self._events_of(step.step, trainer.current_epoch, step.names, host, outcome)
        event = next((e for e in events if e.kind != "overflow"), events[0])
        layers = ", ".join(f"{name} ({norm:.4g})" for name, norm in event.top_layers[:3])
        hint = _HINTS["nonfinite" if event.kind == "nonfinite" else "spike"]
        if reason is None:
            option = "on_nonfinite" if event.kind == "nonfinite" else "on_spike"
            reason = f"{_DESCRIPTIONS[event.kind]} ({option}='raise')"
        raise GradientExplosionError(
            f"ExplosionGuard stopped training at step {event.step} (epoch {event.epoch}): {reason}."
            f" Event: {event.kind}, gradient norm {event.grad_norm:.4g} (baseline {event.baseline:.4g},"
            f" z-score {event.zscore:.4g}), loss {event.loss:.4g}. Worst layers: {layers}. What to try next: {hint}",
            event,
        )

    # reporting ----------------------------------------------------------------------------------------------------
    def _record(self, trainer: pl.Trainer, step: GradStep, values: Tensor, outcome: _Outcome) -> None:
        """Queue this step's values for the flush; the sink turns flagged steps into events (rank 0 only)."""
        if not trainer.is_global_zero:
            return
        epoch, names = trainer.current_epoch, step.names

        def sink(step_number: int, host: list) -> None:
            events = self._events_of(step_number, epoch, names, host, outcome)
            self._pending_events.extend(events)
            counts = host[_StepValues.COUNTS]
            row = {f"{TAG_PREFIX}/events/{e.kind}": counts[EVENT_KINDS.index(e.kind)] for e in events}
            if outcome.skipped is not None:
                row[f"{TAG_PREFIX}/guard/skipped"] = float(outcome.skipped)
            if outcome.rewinds is not None:
                row[f"{TAG_PREFIX}/guard/rewinds"] = float(outcome.rewinds)
            if row:
                self._pending_metrics[step_number] = row

        # added to the shared buffer directly (not through ``step.log_custom``): the JSON-lines file is written
        # even when the Trainer has no logger
        step.runtime.buffer.add_custom(step.step, values, sink)

    def _events_of(
        self, step: int, epoch: int, names: list[str], host: list, outcome: _Outcome
    ) -> list[ExplosionEvent]:
        flags = host[_StepValues.FLAGS]
        if not any(flags):
            return []
        k = (len(host) - _StepValues.TOP) // 2
        indices = host[_StepValues.TOP : _StepValues.TOP + k]
        top = [(names[int(i)], norm) for i, norm in zip(indices, host[_StepValues.TOP + k :])]
        overflow = flags[_OVERFLOW] > 0
        events = []
        for kind, flagged in zip(EVENT_KINDS, flags):
            if not flagged:
                continue
            if kind == "overflow" or (overflow and outcome.action is None and self._responses[kind] != "log"):
                action = "scaler_skipped"
            elif self._responses[kind] == "log" or outcome.action is None:
                action = "logged"
            else:
                action = outcome.action
            loss_driven = kind == "loss_spike"
            events.append(
                ExplosionEvent(
                    step=step,
                    epoch=epoch,
                    kind=kind,
                    grad_norm=host[_StepValues.NORM],
                    loss=host[_StepValues.LOSS],
                    baseline=host[_StepValues.LOSS_BASE if loss_driven else _StepValues.NORM_BASE],
                    zscore=host[_StepValues.LOSS_Z if loss_driven else _StepValues.NORM_Z],
                    action=action,
                    top_layers=top,
                    rank=int(host[_StepValues.ORIGIN]),
                )
            )
        return events

    @override
    def on_flush(self, trainer: pl.Trainer, result: FlushResult) -> None:
        if not self._pending_events and not self._pending_metrics:
            return
        events, self._pending_events = self._pending_events, []
        metrics, self._pending_metrics = self._pending_metrics, {}
        if events:
            append_jsonl(self._resolve_events_path(trainer), events)
            writer = get_runtime(trainer).tensorboard_writer
            for event in events:
                self.tally[(event.kind, event.action)] += 1
                if writer is not None:
                    write_text(writer, TEXT_TAG, event.to_markdown(), event.step)
        for step, row in metrics.items():
            result.metrics.setdefault(step, {}).update(row)

    def _resolve_events_path(self, trainer: pl.Trainer) -> Path:
        if self._events_path is None:
            log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
            self._events_path = Path(log_dir or trainer.default_root_dir) / EVENTS_FILE
        return self._events_path

    def summary(self) -> str:
        """The end-of-fit table: events of this fit per kind and action, skipped steps and rewinds."""
        text = summary_table(self.tally, skipped=self.skipped, rewinds=self.rewinds)
        if self.snapshot.taken:
            text += (
                f"\nrewind snapshot: {self.snapshot.nbytes / 2**20:.2f} MiB on {self.snapshot_device},"
                f" last taken at step {self.snapshot.step} in {self.snapshot.seconds * 1e3:.2f} ms"
            )
        return text

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        rank_zero_info(f"ExplosionGuard summary\n{self.summary()}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, GradientExplosionError):
            rank_zero_info(f"ExplosionGuard summary\n{self.summary()}")

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"events": [rf"{TAG_PREFIX}/events/.*", rf"{TAG_PREFIX}/guard/.*"]}

    # checkpointing ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # at checkpoint time only: the device tensors are copied to the CPU (a host sync)
        return {
            "norm_windows": {i: _on_cpu(d.state_dict()) for i, d in self._norm_detectors.items()},
            "loss_window": _on_cpu(self._loss_detector.state_dict()),
            "counts": self._counts.to("cpu", copy=True),
            "skipped": self.skipped,
            "rewinds": self.rewinds,
            "consecutive_skips": self.consecutive_skips,
            "consecutive_flagged": self.consecutive_flagged,
            "lr_scale": self.lr_scale,
            "next_snapshot_step": self.next_snapshot_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._norm_detectors = {}
        for i, window in state_dict.get("norm_windows", {}).items():
            self._norm_detectors[int(i)] = self._new_detector()
            self._norm_detectors[int(i)].load_state_dict(window)
        self._loss_detector = self._new_detector()
        self._loss_detector.load_state_dict(state_dict.get("loss_window", {}))
        counts = state_dict.get("counts", torch.zeros(len(EVENT_KINDS)))
        self._counts = torch.as_tensor(counts, dtype=torch.float32).clone()
        self.skipped = int(state_dict.get("skipped", 0))
        self.rewinds = int(state_dict.get("rewinds", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.consecutive_flagged = int(state_dict.get("consecutive_flagged", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.next_snapshot_step = int(state_dict.get("next_snapshot_step", 0))


def _on_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.to("cpu", copy=True) for key, value in state.items()}


def _check_positive_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite number but got {value!r}")


def _grad_scaler(trainer: pl.Trainer) -> Optional[Any]:
    return getattr(trainer.precision_plugin, "scaler", None)


def _scaler_found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """Device bool: did the AMP grad scaler find Inf/NaN when it unscaled this optimizer's gradients?

    Lightning's ``MixedPrecision`` plugin unscales before ``on_before_optimizer_step``; the scaler keeps the
    result per optimizer (``found_inf_per_device``) and skips ``optimizer.step()`` when any is set.
    """
    scaler = _grad_scaler(trainer)
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer)) if scaler is not None else None
    found = list(state.get("found_inf_per_device", {}).values()) if state else []
    if not found:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([f.to(device).reshape(()) for f in found]).sum() > 0
