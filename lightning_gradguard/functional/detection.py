"""Spike detection against robust running statistics, on the device, without host synchronisation.

A series of scalars (the global gradient norm, the loss) is kept in a
:class:`~lightning_gradguard.functional.stats.RunningWindow` of its last ``window`` finite values, and each new value
is scored against the window *before* it enters: ``z = (value - center) / spread`` with the median and 1.4826 times
the median absolute deviation (``"median"``, robust: one outlier moves neither) or the mean and standard deviation
(``"mean"``, as OLMo-core's skip-step rule). A value is a spike when ``z > threshold`` once the window holds
``warmup`` values; only upward moves count. The spread is floored at ``0.05 * |center|``, so that a flat history does
not turn ordinary noise into spikes (with the default threshold of 6, nothing below 1.3 times the baseline is one).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_gradguard.functional.stats import RunningWindow

__all__ = ["STATISTICS", "SpikeCheck", "SpikeDetector", "Statistic", "spike_score", "top_layers"]

Statistic = Literal["median", "mean"]
STATISTICS = ("median", "mean")


# 1 / Phi^-1(3/4): scales the MAD to the standard deviation of normal data
MAD_TO_STD = 1.4826
# the spread never drops below this fraction of the center (a flat history would make every wiggle a spike)
MIN_RELATIVE_SPREAD = 0.05


class SpikeCheck(NamedTuple):
    """The verdict on one value, as device tensors: ``flag`` (bool), ``zscore`` and ``baseline`` (float32, NaN
    while the window is empty), ``count`` (number of values in the window before this one)."""

    flag: Tensor
    zscore: Tensor
    baseline: Tensor
    count: Tensor


def _median_absolute_deviation(window: RunningWindow, center: Tensor) -> Tensor:
    # the absolute deviations fill the same slots as the values, so they form a window of their own
    deviations = RunningWindow(window.length, device=window.values.device)
    deviations.values = (window.values - center).abs()
    deviations.count = window.count
    return deviations.quantile(0.5)


def spike_score(value: Tensor, window: RunningWindow, statistic: Statistic = "median") -> tuple[Tensor, Tensor, Tensor]:
    """``(zscore, center, count)`` of ``value`` against the values held by ``window``.

    Example::

        >>> import torch
        >>> window = RunningWindow(5)
        >>> for v in [1.0, 1.1, 0.9, 1.0]:
        ...     _ = window.append(torch.tensor(v))
        >>> z, center, count = spike_score(torch.tensor(3.0), window)
        >>> round(float(z), 2), float(center), int(count)
        (26.98, 1.0, 4)
    """
    value = value.detach().to(window.values.dtype)
    if statistic == "median":
        center = window.quantile(0.5)
        spread = MAD_TO_STD * _median_absolute_deviation(window, center)
    else:
        center = window.mean()
        spread = window.variance().sqrt()
    floor = torch.clamp(MIN_RELATIVE_SPREAD * center.abs(), min=torch.finfo(window.values.dtype).tiny)
    zscore = (value - center) / torch.maximum(spread, floor)
    return zscore, center, window.size


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
        >>> int(detector.window.size)
        7
    """

    def __init__(self, window: int = 128, threshold: float = 6.0, warmup: int = 32, statistic: Statistic = "median"):
        if statistic not in STATISTICS:
            raise ValueError(f"Expected `statistic` to be one of {STATISTICS} but got {statistic!r}")
        self.threshold = float(threshold)  # a Python number: no sync
        self.warmup = int(warmup)
        self.statistic: Statistic = statistic
        self.window = RunningWindow(window)

    def update(self, value: Tensor) -> SpikeCheck:
        """Score ``value`` against the window, then add it to the window if it is finite. Sync-free."""
        if self.window.values.device != value.device:  # first use after construction or a checkpoint load
            self.window.to(value.device)
        zscore, center, count = spike_score(value, self.window, self.statistic)
        flag = torch.isfinite(zscore) & (count >= self.warmup) & (zscore > self.threshold)
        self.window.append(value.detach())
        return SpikeCheck(flag, zscore, center, count)

    def state_dict(self) -> dict[str, Any]:
        return self.window.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.window.load_state_dict(state_dict)


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
