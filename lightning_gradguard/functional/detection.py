"""Spike detection against robust running statistics, on the device, without host synchronisation.

A series of scalars (the global gradient norm, the loss) is kept in a fixed-size window on the device. Each new
value is scored against the statistics of the window *before* it enters:

- ``"median"`` (default): center = median, spread = 1.4826 * MAD (median absolute deviation; the factor makes it
  a consistent estimate of the standard deviation for normal data). One outlier moves neither.
- ``"mean"``: center = mean, spread = standard deviation, as OLMo-core's skip-step rule (mean + 6 sigma of a
  128-step window).

``z = (value - center) / spread`` and a value is a spike when ``z > threshold`` once the window holds at least
``warmup`` values. Only upward moves count: a collapsing norm is no explosion. The spread is floored at
``1e-3 * |center|`` so that a perfectly flat history does not turn rounding noise into spikes.

The window is a tensor filled with NaN until values arrive; ``nanmedian``/``nanmean`` ignore the empty slots and
the number of finite slots is the sample count. A non-finite value never enters the window: the shift that pushes
a new value in is selected with ``torch.where``, not an ``if``. Nothing here reads a value back to the host.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["SpikeCheck", "SpikeDetector", "Statistic", "empty_window", "nan_median", "push_finite", "spike_score", "top_layers"]

Statistic = Literal["median", "mean"]
STATISTICS = ("median", "mean")

# 1 / Phi^-1(3/4): scales the MAD to the standard deviation of normal data
MAD_TO_STD = 1.4826
# the spread never drops below this fraction of the center (a flat history would make every wiggle a spike)
MIN_RELATIVE_SPREAD = 1e-3


class SpikeCheck(NamedTuple):
    """The verdict on one value, as device tensors: ``flag`` (bool), ``zscore`` and ``baseline`` (float32, NaN
    while the window is empty), ``count`` (number of values in the window before this one)."""

    flag: Tensor
    zscore: Tensor
    baseline: Tensor
    count: Tensor


def empty_window(size: int, device: Optional[torch.device] = None) -> Tensor:
    """A float32 window of ``size`` empty (NaN) slots."""
    return torch.full((size,), math.nan, dtype=torch.float32, device=device)


def push_finite(window: Tensor, value: Tensor) -> Tensor:
    """The window with ``value`` appended and the oldest slot dropped, or unchanged when ``value`` is not finite.

    Example::

        >>> import torch
        >>> w = push_finite(empty_window(3), torch.tensor(1.0))
        >>> w = push_finite(w, torch.tensor(float("nan")))
        >>> push_finite(w, torch.tensor(2.0))
        tensor([nan, 1., 2.])
    """
    value = value.detach().to(window.dtype).reshape(1)
    shifted = torch.cat([window[1:], value])
    return torch.where(torch.isfinite(value), shifted, window)


def nan_median(values: Tensor) -> Tensor:
    """The median of the finite entries of a 1-D tensor (mean of the two middle ones for an even count), NaN when
    there are none.

    ``torch.nanmedian`` returns the lower of the two middle values, which makes the MAD of a small window zero
    too often; ``torch.nanquantile`` converts its index tensors with explicit device arguments. Here the middle
    positions stay device tensors and are read with ``gather``.

    Example::

        >>> import torch
        >>> nan_median(torch.tensor([4.0, float("nan"), 1.0, 2.0, 3.0]))
        tensor(2.5000)
    """
    ordered = torch.sort(torch.where(torch.isfinite(values), values, math.nan)).values  # NaN sorts last
    count = torch.isfinite(values).sum()
    middle = torch.stack([(count - 1).clamp(min=0) // 2, count // 2]).clamp(max=values.numel() - 1)
    median = ordered.gather(0, middle).mean()
    return torch.where(count > 0, median, math.nan)


def spike_score(value: Tensor, window: Tensor, statistic: Statistic = "median") -> tuple[Tensor, Tensor, Tensor]:
    """``(zscore, center, count)`` of ``value`` against the finite entries of ``window``.

    Example::

        >>> import torch
        >>> window = torch.tensor([1.0, 1.1, 0.9, 1.0, float("nan")])
        >>> z, center, count = spike_score(torch.tensor(3.0), window)
        >>> round(float(z), 2), float(center), int(count)
        (26.98, 1.0, 4)
    """
    value = value.detach().to(window.dtype)
    count = torch.isfinite(window).sum()
    if statistic == "median":
        center = nan_median(window)
        spread = MAD_TO_STD * nan_median((window - center).abs())
    else:
        center = torch.nanmean(window)
        spread = torch.nanmean((window - center).square()).sqrt()
    floor = torch.clamp(MIN_RELATIVE_SPREAD * center.abs(), min=torch.finfo(window.dtype).tiny)
    zscore = (value - center) / torch.maximum(spread, floor)
    return zscore, center, count


class SpikeDetector:
    """Robust running statistics of one scalar series and the spike verdict for each new value.

    Args:
        window: number of recent finite values the statistics are computed over.
        threshold: a value is a spike when its z-score exceeds this.
        warmup: no value is flagged until the window holds this many finite values (at most ``window``).
        statistic: ``"median"`` (median and MAD, robust) or ``"mean"`` (mean and standard deviation).

    Example::

        >>> import torch
        >>> detector = SpikeDetector(window=8, threshold=6.0, warmup=4)
        >>> flags = [bool(detector.update(torch.tensor(v)).flag) for v in [1.0, 1.1, 0.9, 1.0, 1.05, 9.0, 1.0]]
        >>> flags
        [False, False, False, False, False, True, False]
        >>> bool(detector.update(torch.tensor(float("inf"))).flag)  # non-finite: not a spike, not recorded
        False
        >>> int(torch.isfinite(detector.window).sum())
        7
    """

    def __init__(self, window: int = 128, threshold: float = 6.0, warmup: int = 32, statistic: Statistic = "median"):
        if statistic not in STATISTICS:
            raise ValueError(f"Expected `statistic` to be one of {STATISTICS} but got {statistic!r}")
        self.threshold = float(threshold)
        self.warmup = int(warmup)
        self.statistic: Statistic = statistic
        self.window = empty_window(window)

    def update(self, value: Tensor) -> SpikeCheck:
        """Score ``value`` against the window, then add it to the window if it is finite. Sync-free."""
        if self.window.device != value.device:  # first use after construction or a checkpoint load
            self.window = self.window.to(value.device)
        zscore, center, count = spike_score(value, self.window, self.statistic)
        flag = torch.isfinite(zscore) & (count >= self.warmup) & (zscore > self.threshold)
        self.window = push_finite(self.window, value)
        return SpikeCheck(flag, zscore, center, count)


def top_layers(per_tensor_norms: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices and norms of the ``k`` largest per-tensor norms, non-finite norms first (they are the culprits).

    Example::

        >>> import torch
        >>> top_layers(torch.tensor([0.5, float("nan"), 3.0, 1.0]), 2)
        (tensor([1, 2]), tensor([nan, 3.]))
    """
    k = min(k, per_tensor_norms.numel())
    ranking = torch.nan_to_num(per_tensor_norms, nan=math.inf)
    indices = torch.topk(ranking, k).indices
    return indices, per_tensor_norms.index_select(0, indices)
