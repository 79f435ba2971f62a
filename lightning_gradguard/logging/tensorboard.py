"""TensorBoard specifics: the custom-scalars dashboard, device-side histograms and text reports."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HISTOGRAM_BINS", "histogram_stats", "write_histogram", "write_layout"]

HISTOGRAM_BINS = 64
LAYOUT_TITLE = "gradguard"


def write_layout(writer: Any, charts: dict[str, list[str]]) -> None:
    """Register the "gradguard" custom-scalars layout: one multiline chart per entry (tag regexes)."""
    layout = {LAYOUT_TITLE: {title: ["Multiline", list(tags)] for title, tags in charts.items()}}
    writer.add_custom_scalars(layout)
    writer.flush()


def histogram_stats(grad: Tensor, bins: int = HISTOGRAM_BINS) -> Tensor:
    """A gradient histogram computed on the device without a host read.

    ``torch.histc`` with automatic range reads min and max back to the host, and ``bincount`` reads its length;
    here the range and the bucket index stay device tensors and counts are accumulated with ``index_add_``.
    Non-finite elements are left out. Returns a float32 vector ``[min, max, num, sum, sum_sq, counts...]``.
    """
    g = grad.detach().reshape(-1).float()
    finite = torch.isfinite(g)
    num = finite.sum().float()
    lo = torch.where(finite, g, torch.full_like(g, float("inf"))).amin() if g.numel() else g.new_zeros(())
    hi = torch.where(finite, g, torch.full_like(g, float("-inf"))).amax() if g.numel() else g.new_zeros(())
    lo = torch.where(num > 0, lo, torch.zeros_like(lo))
    hi = torch.where(num > 0, hi, torch.zeros_like(hi))
    gz = torch.where(finite, g, torch.zeros_like(g))
    width = torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
    index = ((gz - lo) / width * bins).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.float32, device=g.device).index_add_(0, index, finite.float())
    head = torch.stack([lo, hi, num, gz.sum(), (gz * gz).sum()])
    return torch.cat([head, counts])


def write_histogram(writer: Any, tag: str, step: int, values: list, bins: int = HISTOGRAM_BINS) -> None:
    """Write a histogram produced by :func:`histogram_stats` (as host values)."""
    lo, hi, num, total, total_sq = values[:5]
    counts = values[5 : 5 + bins]
    if num <= 0:
        return
    width = (hi - lo) / bins if hi > lo else 1.0
    limits = [lo + width * (i + 1) for i in range(bins)]
    writer.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=int(num),
        sum=total,
        sum_squares=total_sq,
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=step,
    )
