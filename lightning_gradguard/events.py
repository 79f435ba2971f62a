"""Explosion events: the record, where it is written, its markdown report and the end-of-fit summary.

Each :class:`ExplosionEvent` is one JSON line of ``gradguard_events.jsonl`` in the directory of the Trainer's first
logger that has one (none is written without, e.g. with ``logger=False`` or ``fast_dev_run``), flushed at once;
non-finite numbers are ``null``. ``run_id`` tells runs in one directory apart; ``attempt`` counts the fits of a run
(a resumed run repeats the steps after its checkpoint under the next attempt).
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["ACTIONS", "EVENTS_FILE", "EVENT_KINDS", "EventLog", "ExplosionEvent", "read_jsonl", "summary_table"]

#: ``nonfinite``: NaN/Inf gradient norm or loss. ``spike``: gradient norm far above its running baseline.
#: ``loss_spike``: loss far above its running baseline. ``threshold``: gradient norm above the absolute ``max_norm``.
#: ``overflow``: the AMP grad scaler found Inf/NaN and skips the step itself (not an explosion).
#: ``scale_collapse``: the AMP loss scale fell below 1, or the scaler skipped many steps in a row: fp16 training
#: is stuck. ``persistent_clipping``: gradient clipping scaled most recent steps down by more than half.
EVENT_KINDS = ("nonfinite", "spike", "loss_spike", "threshold", "overflow", "scale_collapse", "persistent_clipping")
#: what was done about an event
ACTIONS = ("logged", "skipped", "rewound", "raised", "scaler_skipped")
EVENTS_FILE = "gradguard_events.jsonl"
_NUMBERS = ("grad_norm", "loss", "baseline", "zscore")


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) or math.isinf(value) else float(value)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@dataclass
class ExplosionEvent:
    """One explosion event.

    Attributes:
        step: the step it is logged at: Lightning's logging step (``global_step`` with one optimizer).
        epoch: ``trainer.current_epoch``.
        kind: one of :data:`EVENT_KINDS`.
        grad_norm: global gradient L2 norm before clipping (``nan``/``inf`` for non-finite gradients).
        loss: training loss of the step (mean over ranks), ``nan`` when none was seen.
        baseline: running center (median or mean) of the statistic that flagged the event: the loss for
            ``loss_spike``, the gradient norm otherwise; ``nan`` before any value was recorded.
        zscore: how many spreads above the baseline the value was.
        action: one of :data:`ACTIONS`.
        top_layers: ``[(parameter name, gradient norm), ...]``, largest (non-finite first) first.
        rank: the rank the event came from when it can be told (a rank whose own gradients or loss were
            non-finite, or the rank with the largest loss for loss-driven events), else the rank that wrote it.
        optimizer: index of the optimizer whose step it was.
        global_step: ``trainer.global_step``.
        run_id: see the module docstring.
        attempt: see the module docstring.

    Example::

        >>> event = ExplosionEvent(step=7, epoch=0, kind="spike", grad_norm=120.0, loss=0.5, baseline=1.0,
        ...                        zscore=80.0, action="skipped", top_layers=[("net.0.weight", 119.0)])
        >>> ExplosionEvent.from_dict(json.loads(event.to_json())) == event
        True
    """

    step: int
    epoch: int
    kind: str
    grad_norm: float
    loss: float
    baseline: float
    zscore: float
    action: str
    top_layers: list[tuple[str, float]] = field(default_factory=list)
    rank: int = 0
    optimizer: int = 0
    global_step: int = -1
    run_id: str = ""
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in _NUMBERS:
            out[key] = _finite_or_none(out[key])
        out["top_layers"] = [[name, _finite_or_none(norm)] for name, norm in self.top_layers]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplosionEvent:
        # plain JSON values (a line read back from the file): no tensor, no device sync
        numbers = {key: math.nan if data.get(key) is None else float(data[key]) for key in _NUMBERS}
        layers = [(str(name), math.nan if norm is None else float(norm)) for name, norm in data.get("top_layers", [])]
        fields = {key: data[key] for key in ("rank", "optimizer", "global_step", "run_id", "attempt") if key in data}
        return cls(int(data["step"]), int(data["epoch"]), str(data["kind"]), **numbers, action=str(data["action"]),
                   top_layers=layers, **fields)

    def to_markdown(self) -> str:
        """The report written to TensorBoard (text plugin): the numbers and a table of the top layers."""
        baseline_of = "loss" if self.kind == "loss_spike" else "grad norm"
        lines = [
            f"**{self.kind}** at step {self.step} (epoch {self.epoch}, rank {self.rank}): action **{self.action}**",
            "",
            "| quantity | value |",
            "| --- | --- |",
            f"| grad norm | {_fmt(self.grad_norm)} |",
            f"| loss | {_fmt(self.loss)} |",
            f"| baseline ({baseline_of}) | {_fmt(self.baseline)} |",
            f"| z-score | {_fmt(self.zscore)} |",
            "",
            "| # | layer | grad norm |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {i} | {name} | {_fmt(norm)} |" for i, (name, norm) in enumerate(self.top_layers, 1)]
        return "\n".join(lines)


class EventLog:
    """Where the events of one run go: the JSON-lines file, TensorBoard text (``gradguard/events``) and a tally
    of this fit's events by ``(kind, action)`` for the end-of-fit summary.

    Args:
        path: the JSON-lines file, or ``None`` to write none.
        writer: a TensorBoard ``SummaryWriter``, or ``None``.
        run_id: the run's id (a new one by default).
        attempt: the number of this fit within the run.
    """

    def __init__(
        self, path: Optional[Path] = None, writer: Any = None, run_id: Optional[str] = None, attempt: int = 1
    ) -> None:
        self.path = path
        self.writer = writer
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.attempt = attempt
        self.tally: Counter = Counter()

    def write(self, events: list[ExplosionEvent]) -> None:
        for event in events:
            event.run_id, event.attempt = self.run_id, self.attempt
            self.tally[(event.kind, event.action)] += 1
            if self.writer is not None:
                self.writer.add_text("gradguard/events", event.to_markdown(), global_step=event.step)
        if self.writer is not None and events:
            self.writer.flush()
        if self.path is not None and events:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(event.to_json() + "\n" for event in events))


def read_jsonl(path: Union[str, Path]) -> list[ExplosionEvent]:
    """The events written to a ``gradguard_events.jsonl`` file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ExplosionEvent.from_dict(json.loads(line)) for line in lines if line.strip()]


def summary_table(tally: Counter, skipped: int = 0, rewinds: int = 0) -> str:
    """A short text table of events per kind and what was done about them.

    Args:
        tally: counts keyed by ``(kind, action)``.
        skipped: optimizer steps skipped by the guard.
        rewinds: rewinds made by the guard.

    Example::

        >>> from collections import Counter
        >>> print(summary_table(Counter({("nonfinite", "skipped"): 2, ("spike", "logged"): 1}), skipped=2))
        kind       events  logged  skipped  rewound  raised  scaler_skipped
        nonfinite       2       0        2        0       0               0
        spike           1       1        0        0       0               0
        skipped steps: 2, rewinds: 0
    """
    kinds = [k for k in EVENT_KINDS if any(kind == k for kind, _ in tally)]
    if not kinds:
        return f"no explosion events; skipped steps: {skipped}, rewinds: {rewinds}"
    header = ["kind", "events", *ACTIONS]
    rows = [[k, str(sum(tally[(k, a)] for a in ACTIONS)), *(str(tally[(k, a)]) for a in ACTIONS)] for k in kinds]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows), f"skipped steps: {skipped}, rewinds: {rewinds}"])
