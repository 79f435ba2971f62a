"""A deferred buffer of device values, written to the loggers with one host read per flush.

Per-step code appends device tensors (no copy, no sync). At a flush, every buffered value is flattened into one
float32 vector, read to the host once (:func:`~lightning_gradguard.utilities.host_read`), and handed out again:
scalars become ``{tag: value}`` dictionaries per step (so every step keeps its own step number), other entries go
to the sink function that was registered with them (histograms, event records).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_gradguard.utilities import host_read

__all__ = ["DeferredBuffer", "FlushResult"]

Sink = Callable[[int, list], None]


@dataclass
class _Entry:
    step: int
    value: Union[Tensor, float]  # a device tensor, or a number known on the host already
    tag: Optional[str] = None  # a scalar, or a vector expanded to ``tags``
    tags: Optional[list[str]] = None
    sink: Optional[Sink] = None  # receives (step, host values) at flush


@dataclass
class FlushResult:
    """What one flush produced: ``metrics[step] = {tag: value}``, in step order."""

    metrics: dict[int, dict[str, float]]


class DeferredBuffer:
    """Holds device tensors until the next flush.

    Example::

        >>> import torch
        >>> buf = DeferredBuffer()
        >>> buf.add_scalar(0, "gradguard/grad_norm", torch.tensor(2.0))
        >>> buf.add_scalar(1, "gradguard/grad_norm", torch.tensor(3.0))
        >>> buf.flush().metrics
        {0: {'gradguard/grad_norm': 2.0}, 1: {'gradguard/grad_norm': 3.0}}
        >>> len(buf)
        0
    """

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add_scalar(self, step: int, tag: str, value: Union[Tensor, float]) -> None:
        """A device scalar, or a Python number (written as it is)."""
        self._entries.append(_Entry(step, value.detach() if isinstance(value, Tensor) else float(value), tag=tag))

    def add_vector(self, step: int, tags: list[str], values: Tensor) -> None:
        """One scalar per tag, taken from a 1-D tensor (e.g. per-layer norms)."""
        self._entries.append(_Entry(step, values.detach(), tags=list(tags)))

    def add_custom(self, step: int, values: Tensor, sink: Sink) -> None:
        """Any tensor; at the flush ``sink(step, flat host list)`` is called with its values."""
        self._entries.append(_Entry(step, values.detach(), sink=sink))

    def flush(self) -> FlushResult:
        """Read every buffered value to the host in one copy, return the scalars and call the sinks."""
        entries, self._entries = self._entries, []
        metrics: dict[int, dict[str, float]] = {}
        if not entries:
            return FlushResult(metrics)
        tensors = [e.value for e in entries if isinstance(e.value, Tensor)]
        host: list = []
        if tensors:
            device = tensors[0].device
            # the one deliberate host read of a flush
            host = host_read(torch.cat([t.reshape(-1).to(device=device, dtype=torch.float32) for t in tensors]))
        offset = 0
        for e in entries:
            if not isinstance(e.value, Tensor):
                metrics.setdefault(e.step, {})[e.tag] = e.value  # type: ignore[index]
                continue
            n = e.value.numel()
            values = host[offset : offset + n]
            offset += n
            if e.sink is not None:
                e.sink(e.step, values)
                continue
            row = metrics.setdefault(e.step, {})
            if e.tag is not None:
                row[e.tag] = values[0]
            else:
                row.update(zip(e.tags, values))  # type: ignore[arg-type]
        return FlushResult(dict(sorted(metrics.items())))
