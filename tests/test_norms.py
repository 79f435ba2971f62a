"""The norm engine: agreement with torch, dtypes, edge cases, no host sync."""

import math

import pytest
import torch

from lightning_gradguard import HostSyncCounter
from lightning_gradguard.functional import (
    StepGradients,
    grad_norms,
    total_norm,
    unit_norms,
    validate_norm_type,
)

SHAPES = [(7,), (3, 5), (2, 3, 4), (1,), (64, 33), (5, 1, 2, 2)]


def _mixed_tensors(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES * 3):
        dtype = dtypes[i % len(dtypes)]
        out.append((torch.randn(shape, generator=gen) * (10.0 ** (i % 4 - 2))).to(dtype))
    return out


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
def test_agrees_with_torch_get_total_norm_fp32(norm_type):
    tensors = _mixed_tensors([torch.float32])
    per_tensor, total = grad_norms(tensors, norm_type)
    expected_total = torch.nn.utils.get_total_norm(tensors, norm_type)
    expected_each = torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors])
    torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_tensor, expected_each, rtol=1e-6, atol=0)
    assert per_tensor.dtype == total.dtype == torch.float32


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_mixed_dtypes_keep_input_order_and_use_fp32(norm_type):
    tensors = _mixed_tensors([torch.float32, torch.float16, torch.bfloat16, torch.float64])
    per_tensor, total = grad_norms(tensors, norm_type)
    expected_each = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in tensors]).float()
    # half-precision inputs are exact; only the fp32 accumulation differs from the double reference
    torch.testing.assert_close(per_tensor, expected_each, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, torch.linalg.vector_norm(expected_each, norm_type), rtol=1e-5, atol=0)


def test_half_precision_norm_does_not_overflow():
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # the fp16 sum of squares would overflow
    per_tensor, total = grad_norms([big])
    assert torch.isfinite(total)
    torch.testing.assert_close(total, torch.tensor(60000.0 * math.sqrt(1000)), rtol=1e-4, atol=0)


def test_none_entries_are_skipped_and_empty_input_is_zero():
    a, b = torch.ones(4), torch.ones(9)
    per_tensor, total = grad_norms([None, a, None, b])
    assert per_tensor.tolist() == [2.0, 3.0]
    assert total.item() == pytest.approx(math.sqrt(13))
    per_tensor, total = grad_norms([])
    assert per_tensor.numel() == 0 and total.item() == 0.0
    assert total_norm([None, None]).item() == 0.0


def test_nonfinite_values_propagate_into_the_norm():
    per_tensor, total = grad_norms([torch.tensor([1.0, float("nan")]), torch.ones(2)])
    assert math.isnan(per_tensor[0].item()) and per_tensor[1].item() == pytest.approx(math.sqrt(2))
    assert math.isnan(total.item())
    assert math.isinf(total_norm([torch.tensor([float("inf")])]).item())


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_no_host_sync(norm_type):
    tensors = _mixed_tensors([torch.float32, torch.bfloat16])
    with HostSyncCounter() as counter:
        grad_norms(tensors, norm_type)
        grad_norms([])
    assert counter.total == 0, dict(counter.counts)


def test_counter_sees_the_syncs_it_must_catch():
    # the proof above only means something if the counter catches each kind of host read
    t = torch.tensor([0.0, 1.0, 2.0])
    with HostSyncCounter() as counter:
        t.sum().item()
        bool(t.any())
        t.nonzero()
        t[t > 0]
        t.masked_select(t > 1)
        t[t > 1] = 0.0
        t.to("cpu", copy=True)
    assert counter.counts["_local_scalar_dense"] == 2
    assert counter.counts["nonzero"] == 4
    assert counter.counts["to_cpu"] == 1


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.5, ValueError, r"Expected `norm_type` to be a number >= 1 or 'inf' but got 0.5"),
        (float("nan"), ValueError, "norm_type"),
        ("two", ValueError, "'two'"),
        (None, TypeError, "NoneType"),
        (True, TypeError, "bool"),
    ],
)
def test_invalid_norm_type(value, error, match):
    with pytest.raises(error, match=match):
        validate_norm_type(value)


def test_norm_type_strings_and_ints():
    assert validate_norm_type("inf") == math.inf
    assert validate_norm_type(2) == 2.0


@pytest.mark.parametrize(
    "dtypes", [[torch.float32, torch.bfloat16], [torch.float64, torch.float32]], ids=["fp32-bf16", "fp64-fp32"]
)
def test_unit_norms_give_rows_tensors_and_total_in_one_pass(dtypes):
    """Row norms of tensors with two or more dimensions, whole-tensor norms of the others, and the per-tensor and
    global norms they add up to, equal to the direct computations; no host sync. Float64 rows are reduced in their
    own precision and reported in float32 like every other dtype."""
    tensors = _mixed_tensors(dtypes)
    with HostSyncCounter() as counter:
        result = unit_norms(tensors)
    assert counter.total == 0, dict(counter.counts)
    expected_units = torch.cat(
        [
            torch.linalg.vector_norm(t.double(), dim=tuple(range(1, t.ndim))).float()
            if t.ndim > 1
            else torch.linalg.vector_norm(t.double()).float().reshape(1)
            for t in tensors
        ]
    )
    assert result.counts == [t.shape[0] if t.ndim > 1 else 1 for t in tensors]
    torch.testing.assert_close(result.units, expected_units, rtol=1e-6, atol=0)
    per_tensor, total = grad_norms(tensors)
    torch.testing.assert_close(result.per_tensor, per_tensor, rtol=1e-6, atol=0)
    torch.testing.assert_close(result.total, total, rtol=1e-6, atol=0)
    assert result.units.dtype == result.per_tensor.dtype == torch.float32
    empty = unit_norms([])
    assert empty.units.numel() == 0 and empty.total.item() == 0.0 and empty.counts == []


@pytest.mark.parametrize(
    "shapes",
    [
        [(4, 5)] * 3,
        [(7,)] * 4 + [(300, 300)],
        [(3,), (3, 1), (3,), (2, 2), (3,), (2, 2), ()],
        [(600, 500), (5,), (70, 64, 64), (5,), (300, 300), (1, 300000)],
    ],
    ids=["one-stack", "stack-and-large", "mixed", "by-rows"],
)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_each_tensor_gets_its_own_norm_in_its_own_place(shapes, norm_type):
    """Tensors of repeated and mixed shapes, small and large: each gets its own norm, in input order."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]
    per_tensor, total = grad_norms(tensors, norm_type)
    # float64 references: float32 sums of 300k squares (torch's own norm too) are off by a few 1e-6
    expected = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in tensors])
    torch.testing.assert_close(per_tensor.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.double(), torch.linalg.vector_norm(expected, norm_type), rtol=1e-5, atol=0)


def test_unit_norms_keep_autograd_history_of_parameters():
    """Outside ``no_grad`` the unit norms of parameters that require grad are differentiable."""
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    bias = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    units = unit_norms([weight, bias]).units
    assert torch.allclose(units, torch.tensor([5.0, 2.0, math.sqrt(2.0)]))
    units.sum().backward()
    assert torch.allclose(weight.grad, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.allclose(bias.grad, torch.full((2,), 1 / math.sqrt(2.0)))


@pytest.mark.parametrize("first", [torch.float32, torch.float64, torch.bfloat16])
def test_unit_norms_of_whole_tensors_of_mixed_dtypes(first):
    """Whole tensors (biases) of one shape but different dtypes: each tensor gets its own exact norm."""
    gen = torch.Generator().manual_seed(0)
    others = [d for d in (torch.float32, torch.float64, torch.bfloat16) if d != first]
    tensors = [(torch.randn(5, generator=gen) * (i + 1)).to(d) for i, d in enumerate([first, *others, first])]
    tensors.insert(1, torch.randn(3, 4, generator=gen))
    expected = torch.cat(
        [
            torch.linalg.vector_norm(t.double(), dim=1).float()
            if t.ndim > 1
            else torch.linalg.vector_norm(t.double()).float().reshape(1)
            for t in tensors
        ]
    )
    torch.testing.assert_close(unit_norms(tensors).units, expected, rtol=1e-6, atol=0)


def test_step_gradients_leave_out_parameters_without_a_gradient_and_name_the_rest():
    params = [
        torch.nn.Parameter(torch.ones(2, 2)),
        torch.nn.Parameter(torch.ones(3)),
        torch.nn.Parameter(torch.ones(1)),
    ]
    params[0].grad, params[2].grad = torch.full((2, 2), 2.0), torch.tensor([float("nan")])
    step = StepGradients(params, ["w", "b", "s"], with_units=True)
    assert step.names == ["w", "s"] and step.params == [params[0], params[2]]
    assert step.per_tensor[0].item() == pytest.approx(4.0) and step.units[:2].tolist() == [pytest.approx(8**0.5)] * 2
    assert not step.finite.item()
    with pytest.raises(ValueError, match=r"Expected one name per parameter \(3\) but got 2"):
        StepGradients(params, ["w", "b"])
