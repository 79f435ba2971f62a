"""The accelerator's batching of same-shape tensors, run on the CPU.

On a GPU a step over many small tensors is bound by kernel launches, so tensors of one shape are reduced (AGC's row
norms), scaled (AGC's and AdaGC's per-unit coefficients) and clamped (``"value"``) in batches there
(``functional.norms.batches_by_shape``). Here the same code runs on the CPU with ``_BATCH_ON_CPU`` set and must give
the bits of the per-tensor path, non-finite steps included; the launches it saves are counted on the ``meta``
device, which takes the accelerator's code path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.models import TinyMLP, tiny_trainer
from lightning_gradguard import GradientClipping
from lightning_gradguard.functional import GradientClipper, norms
from lightning_gradguard.functional.clipping import _BoundViews
from lightning_gradguard.utilities import KernelLaunchCounter

METHODS = {"agc": {}, "adagc": {"warmup_steps": 1}, "value": {"clip_value": 0.5}}  # AdaGC: per-tensor from step 2


@pytest.fixture
def batching(monkeypatch):
    """``batching(on)``: batch on the CPU (or not), with layouts made afresh under that setting."""

    def set_(on: bool) -> None:
        monkeypatch.setattr(norms, "_BATCH_ON_CPU", on)
        # off: nothing batched at all, not even the CPU's own stacking of small weights for their row norms
        monkeypatch.setattr(norms, "_ROW_STACK_NUMEL", norms._ROW_STACK_NUMEL if on else 0)
        monkeypatch.setattr(norms, "_PLAN_CACHE", {})
        monkeypatch.setattr(_BoundViews, "_cache", {})

    return set_


def _params(seed: int = 0) -> list[nn.Parameter]:
    """Shapes with batches (three or more alike), singles, a 0-d tensor and a 3-d one, in mixed order."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (8, 4),
        (4,),
        (8, 4),
        (3, 2, 2),
        (4,),
        (8, 4),
        (5, 5),
        (4,),
        (3, 2, 2),
        (),
        (3, 2, 2),
        (8, 4),
        (4,),
        (600,),
    ]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grad_stream(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    if step == 3:  # a NaN in one tensor: the whole step is left as it is
        params[2].grad[1, 1] = float("nan")
    if step == 4:  # an Inf
        params[4].grad[0] = float("inf")
    if step == 5:  # then a spike that must still be clipped
        params[5].grad.mul_(1000.0)


def _run(method: str, steps: int = 8) -> tuple[list[list[torch.Tensor]], list[tuple], GradientClipper]:
    params = _params()
    clipper = GradientClipper(method=method, **METHODS[method])
    grads, results = [], []
    for step in range(steps):
        _grad_stream(params, step)
        results.append(tuple(clipper.clip_(params)))
        grads.append([p.grad.clone() for p in params])
    return grads, results, clipper


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_path_gives_the_bits_of_the_per_tensor_path(method, batching):
    batching(False)
    expected_grads, expected_results, _ = _run(method)
    batching(True)
    grads, results, clipper = _run(method)
    # the batches were taken
    if method == "agc":
        assert clipper._rule._layout.scaler.batches
        shapes = tuple(p.shape for p in _params())
        assert norms._unit_plan(shapes, torch.device("cpu")).row_batches
    elif method == "adagc":
        assert clipper._rule._scaler.batches
    else:
        assert any(views.small for views in _BoundViews._cache.values())
    for step, (got, want) in enumerate(zip(grads, expected_grads)):
        for g, w in zip(got, want):
            assert (
                torch.equal(g, w)
                or (torch.isnan(g) == torch.isnan(w)).all()
                and torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0))
            ), f"step {step}"
    for got, want in zip(results, expected_results):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # the non-finite steps were left as they came; the spike after them was clipped
    assert torch.isnan(grads[3][2][1, 1]) and torch.isinf(grads[4][4][0])
    assert results[5][1] < results[5][0]


def test_batched_agc_in_a_real_fit_matches_the_per_tensor_fit(tmp_path, batching, monkeypatch):
    """Three same-shape weights and three same-shape biases. Nothing batched, the CPU's default (small weights
    stacked for their row norms) and the accelerator's batching run on the CPU: the same bits."""
    finals = []
    for mode in ("off", "cpu default", "accelerator"):
        batching(mode == "accelerator")
        if mode == "cpu default":
            monkeypatch.setattr(norms, "_ROW_STACK_NUMEL", 4096)
            shapes = tuple(p.shape for p in TinyMLP().parameters())
            assert norms._unit_plan(shapes, torch.device("cpu")).row_batches  # the 16 x 16 weights are stacked
        model = TinyMLP(lr=0.05, optimizer="adam")
        tiny_trainer(tmp_path, max_steps=12, callbacks=[GradientClipping()]).fit(model)
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            assert torch.equal(a, b)


def _launches(method: str, params: list[nn.Parameter]) -> int:
    clipper = GradientClipper(method=method, **METHODS[method])
    clipper.clip_(params)  # the first step makes the cached layouts
    clipper.warmup_finished()  # AdaGC's steady state, past its safe start (its arithmetic is per step, not per tensor)
    with KernelLaunchCounter() as counter:
        clipper.clip_(params)
    return counter.total


@pytest.mark.parametrize("method", list(METHODS))
def test_batching_cuts_kernel_launches_on_the_accelerator_path(method, monkeypatch):
    """200 tensors (50 x Linear + LayerNorm) on the meta device: with batching a step of AGC, AdaGC or value
    clipping takes a few dozen launches; one per tensor and operation without it."""
    layers = [m for _ in range(50) for m in (nn.Linear(32, 32), nn.LayerNorm(32))]
    params = list(nn.Sequential(*layers).to("meta").parameters())
    for p in params:
        p.grad = torch.empty_like(p)
    monkeypatch.setattr(norms, "_PLAN_CACHE", {})
    monkeypatch.setattr(_BoundViews, "_cache", {})
    batched = _launches(method, params)
    monkeypatch.setattr(norms, "_BATCH_NUMEL", 0)  # nothing qualifies for a batch
    monkeypatch.setattr(norms, "_PLAN_CACHE", {})
    monkeypatch.setattr(_BoundViews, "_cache", {})
    alone = _launches(method, params)
    assert alone >= 200  # at least one launch per tensor
    assert batched <= 80 and batched * 4 <= alone, (batched, alone)
