"""The quantizer math (lightning_gradguard.functional.quantization): statistics, exact rounding, error feedback,
non-finite handling, outlier bounds, state."""

import math

import pytest
import torch

from lightning_gradguard.functional.quantization import (
    QUANTILE_SAMPLES,
    GradientQuantizer,
    decode,
    derive_seed,
    encode,
    levels_for_bits,
    quantize,
)

DRAWS = 4000
WIDTH = 512


def _draws(x: torch.Tensor, method: str, **kwargs) -> torch.Tensor:
    """``DRAWS`` independent quantizations of ``x`` in one call: one row per draw, one block per row."""
    rows = x.expand(DRAWS, -1).contiguous()
    return quantize(rows, method, block_size=x.numel(), seed=3, **kwargs)


def _z_scores(draws: torch.Tensor, target: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(mean of the draws - target) in units of its standard deviation, from the exact per-element variance
    ``step**2 * f * (1 - f)`` of stochastic rounding (``f`` the fractional position between two levels)."""
    f = torch.frac(target.double() / step).abs()
    var = (step**2 * f * (1 - f)).double()
    keep = var > 0
    assert keep.sum() > WIDTH // 2
    # elements exactly on a level have no variance: every draw returns them (up to the float32 rounding of the
    # scale, which is accumulated over many blocks for terngrad's per-tensor bound)
    torch.testing.assert_close(draws[:, ~keep], target[~keep].expand(DRAWS, -1), rtol=1e-4, atol=0)
    mean = draws.double().mean(0)
    return (mean - target.double())[keep] / (var[keep] / DRAWS).sqrt()


def _assert_unbiased(z: torch.Tensor) -> None:
    # each z ~ N(0, 1): |z| < 6 for all of ~500 elements fails with probability ~1e-6; the mean of z**2 over n
    # elements has standard deviation sqrt(2 / n) ~ 0.063, so [0.75, 1.25] is a 4-sigma band
    assert z.abs().max() < 6.0
    assert 0.75 < z.square().mean() < 1.25


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits):
    x = torch.randn(WIDTH, generator=torch.Generator().manual_seed(bits))
    q = _draws(x, "stochastic", bits=bits)
    step = x.abs().max() / levels_for_bits(bits)
    # every draw lies on the grid of its block
    levels = q / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    _assert_unbiased(_z_scores(q, x, step))


def test_qsgd_is_unbiased_and_within_its_variance_bound():
    s = 4
    x = torch.randn(WIDTH, generator=torch.Generator().manual_seed(7))
    q = _draws(x, "qsgd", levels=s)
    norm = x.norm()
    _assert_unbiased(_z_scores(q, x, norm / s))
    # QSGD: E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) * ||v||^2
    bound = min(WIDTH / s**2, math.sqrt(WIDTH) / s) * norm**2
    variance = (q.double() - x.double()).square().sum(1).mean()
    assert variance <= bound


def test_terngrad_is_unbiased_on_the_clipped_gradient():
    x = torch.randn(WIDTH, generator=torch.Generator().manual_seed(11))
    x[:3] = torch.tensor([9.0, -7.0, 6.0])  # outliers beyond 2.5 sigma
    q = _draws(x, "terngrad")
    bound = 2.5 * x.square().mean().sqrt()
    clipped = x.clamp(-bound, bound)
    scale = clipped.abs().max()
    assert set(torch.unique(q / scale).round().tolist()) <= {-1.0, 0.0, 1.0}
    _assert_unbiased(_z_scores(q, clipped, scale))


def test_nearest_rounding_exact_values():
    # scale 127/64: levels / scale = 64 and scale / levels = 1/64 exactly, so every expected value is exact
    x = torch.tensor([1.984375, 0.05, -1.5 / 64, 2.5 / 64, -1.0])
    expected = torch.tensor([127, 3, -2, 2, -64]) / 64.0  # ties go to even
    for seed, step in [(0, 0), (5, 17)]:
        assert torch.equal(quantize(x, bits=8, rounding="nearest", seed=seed, step=step), expected)
    # two blocks: each has its own scale
    both = quantize(torch.cat([x, x / 4]), bits=8, block_size=5, rounding="nearest")
    assert torch.equal(both, torch.cat([expected, expected / 4]))
    # values on the grid are reproduced exactly
    assert torch.equal(quantize(expected, bits=8, rounding="nearest"), expected)


def test_sign_is_scaled_sign_of_gradient_plus_residual():
    g = torch.tensor([0.5, -1.0, 0.25, 2.0])
    quantizer = GradientQuantizer("sign")
    out = g.clone()
    quantizer.quantize_([out], step=0)
    assert torch.equal(out, g.abs().mean() * g.sign())
    residual = quantizer.residuals()["0"]
    out2 = g.clone()
    quantizer.quantize_([out2], step=1)
    p = g + residual
    assert torch.allclose(out2, p.abs().mean() * p.sign())


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("stochastic", dict(bits=4, error_feedback=True, block_size=64)),
        ("qsgd", dict(levels=2, error_feedback=True, block_size=64)),
        ("terngrad", dict(error_feedback=True, clamp_sigma=1e6)),  # bound far away: the identity has no clamped part
        ("sign", dict()),
    ],
)
def test_error_feedback_telescopes(method, kwargs):
    """Over T steps: sum of applied gradients = sum of true gradients - final residual."""
    gen = torch.Generator().manual_seed(0)
    quantizer = GradientQuantizer(method, **kwargs)
    shapes = [(40, 30), (7,), (3, 5, 2)]
    applied_sum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    true_sum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for t in range(25):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for acc, g in zip(true_sum, grads):
            acc += g
        stats = quantizer.quantize_(grads, step=t)
        assert stats.clamped == 0
        assert 0 < stats.rel_error < 3  # qsgd with 2 levels on 64-element buckets: up to sqrt(min(64/4, 8/2)) = 2
        for acc, g in zip(applied_sum, grads):
            acc += g
    residuals = quantizer.residuals()
    for i, (applied, true) in enumerate(zip(applied_sum, true_sum)):
        assert residuals[str(i)].abs().max() > 0
        # float32 tolerance: each step rounds p = g + e and p - Q(p) once
        torch.testing.assert_close(applied, true - residuals[str(i)].double(), rtol=1e-5, atol=1e-4)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("method", ["stochastic", "qsgd", "terngrad", "sign"])
def test_nonfinite_tensors_untouched_and_kept_out_of_residuals(method):
    gen = torch.Generator().manual_seed(1)
    quantizer = GradientQuantizer(method, error_feedback=True, block_size=16)
    names = ["finite", "nan", "inf", "overflow"]
    shapes = [(20, 3), (40,), (5, 5), (33,)]
    warm = [torch.randn(s, generator=gen) for s in shapes]
    quantizer.quantize_(warm, step=0, names=names)
    before = quantizer.residuals()
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[1][17] = math.nan
    grads[2][1, 3] = -math.inf
    grads[3][0] = 3e38  # finite, but its squared norm overflows float32
    original = [g.clone() for g in grads]
    stats = quantizer.quantize_(grads, step=1, names=names)
    after = quantizer.residuals()
    for i in (1, 2, 3):
        assert torch.equal(_bits(grads[i]), _bits(original[i])), names[i]
        assert torch.equal(after[names[i]], before[names[i]]), names[i]
    assert not torch.equal(grads[0], original[0])
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[3]).all()
    assert all(torch.isfinite(r).all() for r in after.values())
    assert not torch.equal(after["finite"], before["finite"])
    # the statistics only cover the tensor that was quantized
    assert stats.numel == 60
    assert torch.isfinite(stats.rel_error) and 0 < stats.rel_error < 1.5


def test_clamp_sigma_bounds_and_counts():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    x[10] = 80.0
    bound = 3.0 * x.square().mean().sqrt()
    expected_fraction = (x.abs() > bound).float().mean()
    quantizer = GradientQuantizer("stochastic", bits=8, clamp_sigma=3.0, rounding="nearest")
    out = x.clone()
    stats = quantizer.quantize_([out], step=0)
    assert stats.clamped_fraction == pytest.approx(expected_fraction.item(), rel=1e-6)
    assert out.abs().max() <= bound * (1 + 1e-6)
    # the outlier no longer sets the scale of its block: the error is that of an outlier-free block
    unbounded = quantize(x, bits=8, rounding="nearest")
    rel = lambda q: ((q - x.clamp(-bound, bound)).norm() / x.clamp(-bound, bound).norm()).item()  # noqa: E731
    assert rel(out) < rel(unbounded) / 5


def test_clamp_quantile_estimates_the_quantile():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    quantizer = GradientQuantizer("stochastic", clamp_quantile=0.9)
    out = x.clone()
    stats = quantizer.quantize_([out], step=0)
    true_bound = x.abs().kthvalue(int(0.9 * x.numel())).values
    # QUANTILE_SAMPLES = 1024: the estimate's rank has standard deviation sqrt(0.9 * 0.1 / 1024) ~ 0.0094, and the
    # density of |g| there (2 * phi(1.645) ~ 0.21) turns it into ~0.045 on the bound (2.8 %); 4-sigma bands
    assert QUANTILE_SAMPLES == 1024
    assert stats.clamped_fraction == pytest.approx(0.1, abs=0.04)
    assert out.abs().max() == pytest.approx(true_bound.item(), rel=0.12)


def test_same_seed_and_step_same_draws_other_step_other_draws():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5))
    a = quantize(x, bits=4, seed=1, step=9)
    assert torch.equal(a, quantize(x, bits=4, seed=1, step=9))
    assert not torch.equal(a, quantize(x, bits=4, seed=1, step=10))
    assert not torch.equal(a, quantize(x, bits=4, seed=2, step=9))
    assert derive_seed(1, 9) != derive_seed(9, 1)


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(6)
    batches = [[torch.randn(70, generator=gen), torch.randn(4, 4, generator=gen)] for _ in range(6)]
    names = ["w", "b"]

    def run(quantizer, steps):
        outs = []
        for t in steps:
            grads = [g.clone() for g in batches[t]]
            quantizer.quantize_(grads, step=t, names=names)
            outs.append(grads)
        return outs

    config = dict(method="stochastic", bits=3, error_feedback=True, block_size=32, seed=11)
    reference = run(GradientQuantizer(**config), range(6))
    first = GradientQuantizer(**config)
    run(first, range(3))
    state = first.state_dict()
    assert set(state) == {"seed", "residuals"} and set(state["residuals"][0]) == {"w", "b"}
    resumed = GradientQuantizer(**{**config, "seed": 0})  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert resumed.state_dict()["residuals"][0]["w"].equal(state["residuals"][0]["w"])  # saved before any step
    for ref, out in zip(reference[3:], run(resumed, range(3, 6))):
        assert all(torch.equal(a, b) for a, b in zip(ref, out))
    # older checkpoints without the keys load with defaults
    GradientQuantizer(**config).load_state_dict({})


def test_residuals_follow_names_when_the_tensor_set_changes():
    quantizer = GradientQuantizer("sign")
    a, b = torch.randn(10), torch.randn(6)
    quantizer.quantize_([a.clone(), b.clone()], step=0, names=["a", "b"])
    kept = quantizer.residuals()["b"]
    quantizer.quantize_([None, b.clone()], step=1, names=["a", "b"])  # "a" got no gradient this step
    p = b + kept
    assert torch.allclose(quantizer.residuals()["b"], p - p.abs().mean() * p.sign())
    assert set(quantizer.residuals()) == {"b"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    g = torch.randn(300, generator=torch.Generator().manual_seed(8)).to(dtype)
    quantizer = GradientQuantizer("stochastic", bits=8, error_feedback=True)
    out = g.clone()
    quantizer.quantize_([out], step=0)
    assert out.dtype == dtype and not torch.equal(out, g)
    # the residual refers to the gradient the optimizer sees, in its own dtype
    torch.testing.assert_close(quantizer.residuals()["0"].double(), (g.double() - out.double()), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="int8"), ValueError, "Expected `method` to be one of"),
        (dict(bits=1), ValueError, r"Expected `bits` to be an integer in \[2, 8\] but got 1"),
        (dict(bits=9), ValueError, r"Expected `bits` to be an integer in \[2, 8\] but got 9"),
        (dict(bits=8.0), TypeError, "Expected `bits` to be an integer in .* but got float"),
        (dict(levels=4), ValueError, "`levels` applies to method='qsgd' only"),
        (dict(method="sign", bits=4), ValueError, "`bits` does not apply to method='sign' .* but got bits=4"),
        (dict(method="terngrad", bits=2), ValueError, "`bits` does not apply to method='terngrad'"),
        (dict(method="qsgd", bits=4, levels=3), ValueError, "at most one of `bits` and `levels` .* got 4 and 3"),
        (dict(method="qsgd", levels=0), ValueError, "Expected `levels` to be an integer >= 1 but got 0"),
        (dict(block_size=0), ValueError, "Expected `block_size` to be an integer >= 1 but got 0"),
        (dict(rounding="floor"), ValueError, "Expected `rounding` to be one of"),
        (dict(method="sign", rounding="nearest"), ValueError, "method='sign' has no rounding step"),
        # every value given counts, the defaults too: the callback passes None where the user gave nothing
        (dict(method="sign", rounding="stochastic"), ValueError, "method='sign' has no rounding step"),
        (dict(method="sign", bits=8), ValueError, "`bits` does not apply to method='sign' .* but got bits=8"),
        (dict(method="terngrad", bits=8), ValueError, "`bits` does not apply to method='terngrad'"),
        (dict(method="qsgd", bits=8, levels=5), ValueError, "at most one of `bits` and `levels` .* got 8 and 5"),
        (dict(method="sign", error_feedback=False), ValueError, "always uses error feedback"),
        (dict(error_feedback="yes"), TypeError, "Expected `error_feedback` to be a bool or None but got str"),
        (dict(clamp_sigma=0), ValueError, "Expected `clamp_sigma` to be a positive finite number or None but got 0"),
        (dict(clamp_sigma=math.inf), ValueError, "Expected `clamp_sigma` to be a positive finite number"),
        (dict(clamp_sigma="3"), TypeError, "Expected `clamp_sigma` to be .* but got str"),
        (dict(clamp_quantile=1.5), ValueError, r"`clamp_quantile` to be a number in \(0, 1\] or None but got 1.5"),
        (dict(clamp_sigma=3.0, clamp_quantile=0.9), ValueError, "at most one of `clamp_sigma` and `clamp_quantile`"),
        (dict(seed=-1), ValueError, "Expected `seed` to be an integer >= 0 but got -1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientQuantizer(**kwargs)


def test_encode_decode_on_blocks():
    blocks = torch.tensor([[0.5, -1.0, 0.25, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, math.nan, 0.0, 1.0]])
    codes, scales = encode(blocks, "stochastic", 7, generator=torch.Generator().manual_seed(0))
    finite = codes[:2]  # the codes of a block that is not finite mean nothing: the callers keep or mask that block
    assert finite.abs().max() <= 7 and torch.equal(finite, finite.round())
    values = decode(codes, scales, 7)
    assert torch.equal(scales[:2], torch.tensor([2.0, 0.0])) and torch.equal(values[1], torch.zeros(4))
    assert torch.isnan(values[2]).all()  # a NaN scale makes the whole block NaN
    assert ((values[0] - blocks[0]).abs() <= 2.0 / 7).all()  # within one level of the input
    # sign: the sign bit of each element (a zero counts as positive, -0.0 as negative); the scale is the mean |x|
    codes, scales = encode(blocks[:2], "sign", 1)
    assert codes.tolist() == [[1, -1, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(decode(codes, scales, 1), torch.tensor([[0.9375, -0.9375, 0.9375, 0.9375], [0.0] * 4]))
    assert encode(torch.tensor([[-0.0, 0.0]]), "sign", 1)[0].tolist() == [[-1, 1]]
    # to nearest without a generator; decode can write into the codes
    codes, scales = encode(torch.tensor([[0.5, -1.0, 0.26, 0.0]]), "stochastic", 1)
    assert codes.tolist() == [[0, -1, 0, 0]] and scales.tolist() == [1.0]
    assert decode(codes, scales, 1, out=codes) is codes and codes.tolist() == [[0, -1, 0, 0]]


def test_terngrad_defaults_to_its_clip():
    assert GradientQuantizer("terngrad").clamp_sigma == 2.5
    assert GradientQuantizer("terngrad", clamp_quantile=0.99).clamp_sigma is None
    assert GradientQuantizer("stochastic").clamp_sigma is None
    assert GradientQuantizer("sign").error_feedback and not GradientQuantizer("qsgd").error_feedback


@pytest.mark.parametrize("kwargs", [dict(clamp_quantile=0.9), dict(method="sign"), dict(clamp_sigma=2.0)])
def test_empty_tensors_as_under_uneven_fsdp2_shards(kwargs):
    """A rank's shard can be empty (fewer rows than ranks); alone or after others in a group, it is a no-op."""
    quantizer = GradientQuantizer(**kwargs)
    full, empty = torch.randn(50), torch.zeros(0, 4)
    stats = quantizer.quantize_([full, empty], step=0, names=["w", "b"])
    assert stats.numel == 50 and empty.shape == (0, 4)
    stats = GradientQuantizer(**kwargs).quantize_([torch.zeros(0)], step=0)
    assert stats.numel == 0 and stats.rel_error == 0 and stats.clamped_fraction == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="stochastic"),
        dict(method="stochastic", rounding="nearest", clamp_quantile=0.99),
        dict(method="stochastic", error_feedback=True, clamp_sigma=3.0),
        dict(method="qsgd", error_feedback=True, clamp_quantile=0.9),
        dict(method="terngrad"),
        dict(method="sign"),
    ],
)
def test_no_host_syncs(kwargs):
    """Every path, the first call (which builds the layout) included, is free of device-to-host reads."""
    from lightning_gradguard.utilities import HostSyncCounter

    grads = [torch.randn(300, 7), torch.randn(5), torch.randn(2, 2)]
    grads[1][2] = math.inf
    quantizer = GradientQuantizer(**kwargs)
    for step in range(3):
        with HostSyncCounter() as counter:
            stats = quantizer.quantize_([g.clone() for g in grads], step=step)
            _ = stats.rel_error, stats.clamped_fraction
        assert counter.total == 0, dict(counter.counts)
