"""Read TensorBoard event files back, as TensorBoard itself does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` for every scalar tag in ``log_dir`` (fails on a repeated step of a gradguard tag)."""
    acc = load_events(log_dir)
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        series: dict[int, float] = {}
        for event in acc.Scalars(tag):
            if tag.startswith("gradguard/"):
                assert event.step not in series, f"step {event.step} of {tag} written twice"
            series[event.step] = event.value
        out[tag] = series
    return out


def read_layout(log_dir: str | Path) -> dict[str, Any]:
    """The custom-scalars layout written to ``log_dir``, as a dict (``{category: {chart: [tag regexes]}}``)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = load_events(log_dir)
    events = acc.Tensors("custom_scalars__config__")
    assert events, "no custom-scalars layout in the event file"
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])
    out: dict[str, Any] = {}
    for category in layout.category:
        out[category.title] = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    return out
