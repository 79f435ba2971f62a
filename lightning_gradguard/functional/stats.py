"""Running statistics of a stream of scalars (gradient norms), kept on the device, never poisoned.

:class:`RunningWindow` keeps the last ``length`` finite values (quantiles as ``torch.quantile``, mean, variance);
:class:`EmaMoments` keeps an exponential moving mean and variance (ZClip's update order). Both update without a host
read, and a NaN or Inf value (or one masked off) leaves the state exactly as it was (``torch.where``), so one bad
step cannot poison a run. ``state_dict`` / ``load_state_dict`` round-trip the state, ``to(device)`` moves it.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_gradguard.utilities import to_device

__all__ = ["EmaMoments", "RunningWindow"]

_DTYPE = torch.float32


def _check_length(length: Any) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"Expected `length` to be a positive integer but got {length!r}")
    return length


def _keep(value: Tensor, mask: Optional[Tensor]) -> Tensor:
    keep = value.abs() < math.inf  # finite (NaN compares false): two kernels, where `isfinite` takes four
    return keep if mask is None else keep & mask


class RunningWindow:
    """The last ``length`` finite values of a scalar stream, as a device ring buffer.

    Empty slots hold NaN; statistics are taken over the filled slots only, and are NaN while the window is empty.

    Args:
        length: how many values the window keeps.
        device: where the state lives.

    Example::

        >>> import torch
        >>> window = RunningWindow(4)
        >>> for v in [3.0, float("nan"), 1.0, 2.0]:
        ...     _ = window.append(torch.tensor(v))
        >>> window.size
        tensor(3)
        >>> window.quantile(0.9)
        tensor(2.8000)
        >>> window.median()
        tensor(2.)
    """

    def __init__(self, length: int, device: Optional[Union[str, torch.device]] = None) -> None:
        self.length = _check_length(length)
        self.values = torch.full((length,), math.nan, dtype=_DTYPE, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=self.values.device)  # finite values ever appended
        self._tables: dict[tuple[float, str], tuple[Tensor, Tensor]] = {}  # quantile rank arithmetic per fill level

    @property
    def size(self) -> Tensor:
        """How many slots are filled (a device tensor)."""
        return self.count.clamp(max=self.length)

    def append(self, value: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Write ``value`` over the oldest slot when it is finite and ``mask`` (a device bool) allows.

        Returns the device bool saying whether the value went in.
        """
        keep = _keep(value, mask)
        pos = (self.count % self.length).reshape(1)
        current = self.values.index_select(0, pos)
        self.values.index_copy_(0, pos, torch.where(keep, value.to(_DTYPE).reshape(1), current))
        self.count.add_(keep.to(torch.long))
        return keep

    def quantile(self, q: float, interpolation: Literal["linear", "lower"] = "linear") -> Tensor:
        """The ``q``-quantile of the filled slots, computed like ``torch.quantile`` (NaN when empty).

        ``torch.nanquantile`` would do, but it converts its rank through ``_to_copy`` calls that name the device
        explicitly, which the CPU sync counter cannot tell from a host read. Here the rank arithmetic of every
        possible fill level (``0 .. length``) is done once, as ``torch.quantile`` does it, into a small device
        table; a step looks its fill level up in it (a handful of device operations).
        An empty window reads slot 0 of the sorted values, a NaN: the result is NaN without a branch.
        """
        ordered = torch.sort(self.values).values  # NaN (empty slots) sort last
        indices, weights = self._quantile_table(q, interpolation)
        level = self.size.reshape(1)
        lo_hi = indices.index_select(0, level).reshape(2)
        values = ordered.gather(0, lo_hi)
        if interpolation == "lower":
            return values[0]
        return torch.lerp(values[0], values[1], weights.index_select(0, level).reshape(()))

    def _quantile_table(self, q: float, interpolation: str) -> tuple[Tensor, Tensor]:
        key = (q, interpolation)
        table = self._tables.get(key)
        if table is None or table[0].device != self.values.device:
            # torch.quantile's own arithmetic: rank = q * (n - 1) in the values' dtype, truncated / ceiled
            device = self.values.device
            levels = (torch.arange(self.length + 1, device=device) - 1).clamp(min=0)
            ranks = levels.to(_DTYPE) * torch.full((), q, dtype=_DTYPE, device=device)
            below = ranks.to(torch.long)
            above = below if interpolation == "lower" else ranks.ceil().to(torch.long)
            table = (torch.stack([below, above], dim=1), ranks - below)
            self._tables[key] = table
        return table

    def median(self) -> Tensor:
        """The lower median of the filled slots (an actual sample, robust while fewer than half are outliers)."""
        return self.quantile(0.5, interpolation="lower")

    def mean(self) -> Tensor:
        """Mean of the filled slots (NaN when empty)."""
        return torch.nanmean(self.values)

    def variance(self) -> Tensor:
        """Population variance of the filled slots (NaN when empty)."""
        return torch.nanmean((self.values - self.mean()) ** 2)

    def to(self, device: Union[str, torch.device]) -> RunningWindow:
        self.values = to_device(self.values, device)
        self.count = to_device(self.count, device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.clone(), "count": self.count.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`. A window saved with another ``length`` keeps its most recent values, as many as
        fit, as if they were the only ones ever appended."""
        values, count = state_dict.get("values"), state_dict.get("count")
        if count is not None:
            self.count = to_device(torch.as_tensor(count, dtype=torch.long), self.count.device).clone()
        if values is None:
            return
        values = values.to(_DTYPE)
        if values.shape != self.values.shape:
            # sync: a checkpoint is being loaded, not a step taken
            saved, count = values.numel(), int(self.count)
            oldest_first = values.roll(-(count % saved))[-min(count, saved) :] if count else values[:0]
            kept = oldest_first[-self.length :].cpu()  # sync: at load, as above
            values = torch.cat([kept, torch.full((self.length - kept.numel(),), math.nan)])
            self.count = to_device(torch.tensor(kept.numel()), self.count.device)
        self.values = to_device(values, self.values.device).clone()


class EmaMoments:
    r"""Exponential moving mean and variance of a scalar stream.

    ``mean <- alpha * mean + (1 - alpha) * x`` and then ``var <- alpha * var + (1 - alpha) * (x - mean)^2``
    (with the *new* mean, the order of ZClip). Updates are ignored until :meth:`start` has set the moments.

    Args:
        alpha: weight of the past, in ``(0, 1)``.
        device: where the state lives.

    Example::

        >>> import torch
        >>> ema = EmaMoments(alpha=0.5)
        >>> ema.start(torch.tensor(2.0), torch.tensor(1.0))
        >>> ema.update(torch.tensor(4.0))
        >>> ema.update(torch.tensor(float("inf")))  # ignored
        >>> ema.mean, ema.var
        (tensor(3.), tensor(1.))
    """

    def __init__(self, alpha: float, device: Optional[Union[str, torch.device]] = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"Expected `alpha` to be a number in (0, 1) but got {alpha!r}")
        self.alpha = float(alpha)
        self.mean = torch.zeros((), dtype=_DTYPE, device=device)
        self.var = torch.zeros((), dtype=_DTYPE, device=self.mean.device)
        self.started = torch.zeros((), dtype=torch.bool, device=self.mean.device)

    def start(self, mean: Tensor, var: Tensor, mask: Optional[Tensor] = None) -> None:
        """Set the moments where ``mask`` allows (and both values are finite)."""
        keep = _keep(mean, mask) & torch.isfinite(var)
        self.mean = torch.where(keep, mean.to(_DTYPE), self.mean)
        self.var = torch.where(keep, var.to(_DTYPE), self.var)
        self.started = self.started | keep

    def update(self, value: Tensor, mask: Optional[Tensor] = None) -> None:
        """Fold ``value`` in, if the moments are started, ``value`` is finite and ``mask`` allows."""
        keep = _keep(value, mask) & self.started
        value = value.to(_DTYPE)
        # ZClip's arithmetic as written (a `lerp` would be one kernel, but it rounds differently)
        mean = self.alpha * self.mean + (1 - self.alpha) * value
        var = self.alpha * self.var + (1 - self.alpha) * (value - mean) ** 2
        self.mean = torch.where(keep, mean, self.mean)
        self.var = torch.where(keep, var, self.var)

    def to(self, device: Union[str, torch.device]) -> EmaMoments:
        self.mean, self.var, self.started = (to_device(t, device) for t in (self.mean, self.var, self.started))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "started": self.started.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        device = self.mean.device
        self.mean = to_device(torch.as_tensor(state_dict.get("mean", self.mean), dtype=_DTYPE), device).clone()
        self.var = to_device(torch.as_tensor(state_dict.get("var", self.var), dtype=_DTYPE), device).clone()
        started = torch.as_tensor(state_dict.get("started", self.started), dtype=torch.bool)
        self.started = to_device(started, device).clone()
