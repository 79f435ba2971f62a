"""Running statistics: the window's quantiles against torch.quantile at every fill level, NaN-free updates."""

import math

import pytest
import torch

from lightning_gradguard import HostSyncCounter
from lightning_gradguard.functional.stats import EmaMoments, RunningWindow


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("interpolation", ["linear", "lower"])
def test_window_quantile_equals_torch_quantile_at_every_fill_level(q, interpolation):
    """Empty (NaN), filling up, full and wrapping around: ``torch.quantile`` over what is held (the same rank
    arithmetic; the interpolation may round the last bit differently)."""
    gen = torch.Generator().manual_seed(0)
    stream = torch.rand(23, generator=gen) * 10
    window = RunningWindow(8)
    assert math.isnan(window.quantile(q, interpolation).item())
    for i, value in enumerate(stream):
        window.append(value)
        held = stream[max(0, i - 7) : i + 1]
        expected = torch.quantile(held, q, interpolation=interpolation)
        torch.testing.assert_close(window.quantile(q, interpolation), expected, rtol=1e-6, atol=0, msg=str((i, q)))


def test_window_and_ema_skip_nonfinite_values_without_host_sync():
    window, ema = RunningWindow(4), EmaMoments(0.5)
    ema.start(torch.tensor(1.0), torch.tensor(0.0))
    with HostSyncCounter() as counter:
        for v in [1.0, float("nan"), 2.0, float("inf"), -float("inf"), 3.0]:
            window.append(torch.tensor(v))
            ema.update(torch.tensor(v))
        median = window.median()
    assert counter.total == 0, dict(counter.counts)
    assert window.count.item() == 3 and median.item() == 2.0
    assert math.isfinite(ema.mean.item()) and math.isfinite(ema.var.item())
