"""Explosion events: the record, its JSON-lines file, its markdown report and the end-of-fit summary.

One :class:`ExplosionEvent` is written per detected event (a step can produce several, e.g. a gradient-norm spike
and a loss spike) as one JSON object per line of ``gradguard_events.jsonl``, appended and flushed at once so that
the file can be read while training runs. Non-finite numbers are written as ``null`` (strict JSON has no NaN).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["ACTIONS", "EVENT_KINDS", "ExplosionEvent", "append_jsonl", "read_jsonl", "summary_table"]

#: ``nonfinite``: NaN/Inf gradient norm or loss. ``spike``: gradient norm far above its running baseline.
#: ``loss_spike``: loss far above its running baseline. ``threshold``: gradient norm above the absolute ``max_norm``.
#: ``overflow``: the AMP grad scaler found Inf/NaN and skips the step itself (not an explosion).
EVENT_KINDS = ("nonfinite", "spike", "loss_spike", "threshold", "overflow")
#: what was done about an event
ACTIONS = ("logged", "skipped", "rewound", "raised", "scaler_skipped")


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) or math.isinf(value) else float(value)


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


@dataclass
class ExplosionEvent:
    """One explosion event.

    Attributes:
        step: ``trainer.global_step`` of the optimizer step.
        epoch: ``trainer.current_epoch``.
        kind: one of :data:`EVENT_KINDS`.
        grad_norm: global gradient L2 norm before clipping (``nan``/``inf`` for non-finite gradients).
        loss: training loss of the step (mean over ranks), ``nan`` when the guard saw none.
        baseline: running center (median or mean) of the statistic that flagged the event: the loss for
            ``loss_spike``, the gradient norm otherwise; ``nan`` before any value was recorded.
        zscore: how many spreads above the baseline the value was.
        action: one of :data:`ACTIONS`.
        top_layers: ``[(parameter name, gradient norm), ...]``, largest (non-finite first) first.
        rank: the rank the event came from when it can be told (the first rank whose loss was non-finite or the
            rank with the largest loss, for loss-driven events), else the rank that wrote the record.

    Example::

        >>> event = ExplosionEvent(step=7, epoch=0, kind="spike", grad_norm=120.0, loss=0.5, baseline=1.0,
        ...                        zscore=80.0, action="skipped", top_layers=[("net.0.weight", 119.0)], rank=0)
        >>> ExplosionEvent.from_dict(json.loads(event.to_json())) == event
        True
        >>> print(event.summary())
        spike at step 7 (epoch 0): grad norm 120, baseline 1, z 80, action skipped, top layer net.0.weight (119)
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("grad_norm", "loss", "baseline", "zscore"):
            out[key] = _finite_or_none(out[key])
        out["top_layers"] = [[name, _finite_or_none(norm)] for name, norm in self.top_layers]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplosionEvent:
        def num(value: Optional[float]) -> float:
            return math.nan if value is None else float(value)

        return cls(
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            kind=str(data["kind"]),
            grad_norm=num(data.get("grad_norm")),
            loss=num(data.get("loss")),
            baseline=num(data.get("baseline")),
            zscore=num(data.get("zscore")),
            action=str(data["action"]),
            top_layers=[(str(name), num(norm)) for name, norm in data.get("top_layers", [])],
            rank=int(data.get("rank", 0)),
        )

    def summary(self) -> str:
        """One line: kind, step, numbers, action and the worst layer."""
        top = f", top layer {self.top_layers[0][0]} ({self.top_layers[0][1]:.4g})" if self.top_layers else ""
        return (
            f"{self.kind} at step {self.step} (epoch {self.epoch}): grad norm {self.grad_norm:.4g},"
            f" baseline {self.baseline:.4g}, z {self.zscore:.4g}, action {self.action}{top}"
        )

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


def append_jsonl(path: Union[str, Path], events: list[ExplosionEvent]) -> None:
    """Append one JSON line per event to ``path`` (created with its folder if missing) and flush it."""
    if not events:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(event.to_json() + "\n" for event in events))
        f.flush()


def read_jsonl(path: Union[str, Path]) -> list[ExplosionEvent]:
    """The events written to ``path`` by :func:`append_jsonl`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ExplosionEvent.from_dict(json.loads(line)) for line in lines if line.strip()]


def summary_table(tally: Counter, skipped: int = 0, rewinds: int = 0) -> str:
    """A short text table of events per kind and what was done about them.

    Args:
        tally: counts keyed by ``(kind, action)``.
        skipped, rewinds: optimizer steps skipped and rewinds made by the guard.

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
