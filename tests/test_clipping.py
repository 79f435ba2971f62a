"""GradientClipping in real Trainer.fit runs: step-by-step agreement with the reference implementations (zclip,
autoclip, timm's AGC formula, torch), non-finite steps, the safe start, no host syncs, resume, logging, errors."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import pytest
import torch
from autoclip.torch import QuantileClip
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from zclip import ZClip

from lightning_gradguard import GradientNormMonitor, HostSyncCounter
from lightning_gradguard.callbacks.clipping import GradientClipping
from lightning_gradguard.functional.clipping import (
    GradientClipper,
    adagc_coefficients,
    agc_coefficients,
    clamp_,
    scale_,
)
from tests.helpers.faults import Faults
from tests.helpers.models import TinyMLP, tiny_trainer
from tests.helpers.reads import NormReadCounter
from tests.helpers.sync import counting
from tests.helpers.tb import read_layout, read_scalars

REFERENCE_SAFE_START_OFF = {"warmup_factor": math.inf, "warmup_threshold": math.inf}


# ---------------------------------------------------------------------------------------------------------------
# test-side callbacks: they run before / after the gradguard pipeline, in the Trainer's callback order
# ---------------------------------------------------------------------------------------------------------------


class Snapshot(Callback):
    """Copies of the gradients (and weights) of every step, as they are when this callback runs."""

    def __init__(self) -> None:
        self.grads: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self.grads[trainer.global_step] = [p.grad.detach().clone() for p in params]
        self.weights[trainer.global_step] = [p.detach().clone() for p in params]


class DropNonFinite(Callback):
    """Stands in for a guard after clipping: a step with non-finite gradients does not update the model."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not torch.isfinite(torch.nn.utils.get_total_norm(grads)):  # test-side host read
            for p in pl_module.parameters():
                p.grad = None


def fit(tmp_path, clipping: Callback, before=(), after=(), model=None, max_steps=30, **trainer_kwargs):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = tiny_trainer(
        tmp_path,
        max_steps=max_steps,
        callbacks=[*before, clipping, *after],
        logger=tb,
        log_every_n_steps=7,
        **trainer_kwargs,
    )
    model = model if model is not None else TinyMLP(lr=0.05)
    trainer.fit(model)
    return read_scalars(tb.log_dir), model, trainer


# ---------------------------------------------------------------------------------------------------------------
# the references, replayed on the gradients the run saw
# ---------------------------------------------------------------------------------------------------------------


def _holder(grads: list[torch.Tensor], weights: Optional[list[torch.Tensor]] = None) -> nn.Module:
    """A module whose parameters carry the recorded weights and a copy of the recorded gradients."""
    module = nn.Module()
    module.params = nn.ParameterList(
        [nn.Parameter(w.clone()) for w in (weights if weights is not None else [torch.zeros_like(g) for g in grads])]
    )
    for p, g in zip(module.parameters(), grads):
        p.grad = g.clone()
    return module


def replay_zclip(snap: Snapshot, **kwargs: Any) -> list[tuple[Optional[float], list[torch.Tensor]]]:
    """zclip's clipped gradients, and its threshold at the steps where it clips (``None`` elsewhere: zclip has no
    threshold for a norm it does not clip)."""
    zclip = ZClip(mode="zscore", **kwargs)
    out = []
    for step in sorted(snap.grads):
        module = _holder(snap.grads[step])
        norm = torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]).item()
        threshold = (zclip._compute_clip_val(norm) if zclip.initialized else None) or math.inf
        if zclip.max_grad_norm is not None:
            threshold = min(threshold, zclip.max_grad_norm)
        zclip.step(module)
        out.append((threshold if threshold < norm else None, [p.grad for p in module.parameters()]))
    return out


def replay_autoclip(snap: Snapshot, quantile: float, history_length: int) -> list[tuple[float, list[torch.Tensor]]]:
    module = _holder(snap.grads[0])
    clipper = QuantileClip(
        list(module.parameters()), quantile=quantile, history_length=history_length, global_threshold=True
    )
    out = []
    for step in sorted(snap.grads):
        for p, g in zip(module.parameters(), snap.grads[step]):
            p.grad = g.clone()
        history = clipper.state["global_history"]
        threshold = torch.quantile(history, quantile).item() if len(history) else math.inf
        clipper.step()
        out.append((threshold, [p.grad.clone() for p in module.parameters()]))
    return out


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad (pytorch-image-models, Apache-2.0), reproduced as the reference."""

    def unitwise_norm(x, norm_type=2.0):
        if x.ndim <= 1:
            return x.norm(norm_type)
        # works for nn.ConvNd and nn.Linear where output dim is first in the kernel/weight tensor
        return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def replay_timm_agc(snap: Snapshot, clip_factor: float, eps: float) -> list[tuple[float, list[torch.Tensor]]]:
    out = []
    for step in sorted(snap.grads):
        module = _holder(snap.grads[step], snap.weights[step])
        limits = [
            (w.norm(dim=tuple(range(1, w.ndim))) if w.ndim > 1 else w.norm().reshape(1)).clamp(min=eps) * clip_factor
            for w in snap.weights[step]
        ]
        timm_adaptive_clip_grad(module.parameters(), clip_factor, eps)
        out.append((torch.cat(limits).norm().item(), [p.grad for p in module.parameters()]))
    return out


def replay_torch(snap: Snapshot, clip: Callable, value: float) -> list[tuple[float, list[torch.Tensor]]]:
    out = []
    for step in sorted(snap.grads):
        module = _holder(snap.grads[step])
        clip(module.parameters(), value)
        out.append((value, [p.grad for p in module.parameters()]))
    return out


SPIKES = {8: 30.0, 15: 50.0, 16: 0.2, 22: 40.0}

REFERENCE_CASES = {
    "zscore-adaptive": (
        dict(method="zscore", alpha=0.9, z_thresh=2.0, warmup_steps=5, **REFERENCE_SAFE_START_OFF),
        lambda snap: replay_zclip(snap, alpha=0.9, z_thresh=2.0, warmup_steps=5, max_grad_norm=None),
    ),
    "zscore-mean-capped": (
        dict(method="zscore", zscore_mode="mean", warmup_steps=5, max_norm=2.0, **REFERENCE_SAFE_START_OFF),
        lambda snap: replay_zclip(snap, warmup_steps=5, clip_option="mean", max_grad_norm=2.0),
    ),
    "quantile": (
        dict(method="quantile", quantile=0.8, history_length=10, **REFERENCE_SAFE_START_OFF),
        lambda snap: replay_autoclip(snap, quantile=0.8, history_length=10),
    ),
    "agc": (
        dict(method="agc", agc_factor=0.02, agc_eps=1e-3, agc_exclude=()),
        lambda snap: replay_timm_agc(snap, clip_factor=0.02, eps=1e-3),
    ),
    "norm": (dict(method="norm", max_norm=0.5), lambda snap: replay_torch(snap, torch.nn.utils.clip_grad_norm_, 0.5)),
    "value": (
        dict(method="value", clip_value=0.05),
        lambda snap: replay_torch(snap, torch.nn.utils.clip_grad_value_, 0.05),
    ),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_matches_reference_step_by_step(tmp_path, case):
    """Same hyper-parameters, same gradient stream: the same clipped gradients and thresholds at every step."""
    config, replay = REFERENCE_CASES[case]
    before, after = Snapshot(), Snapshot()
    scalars, _, _ = fit(tmp_path, GradientClipping(**config), before=[Faults(grads=SPIKES), before], after=[after])
    reference = replay(before)
    assert len(reference) == 30
    clipped_steps = 0
    for step, (threshold, ref_grads) in enumerate(reference):
        ours = after.grads[step]
        for a, b in zip(ours, ref_grads):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)
        ref_norm = torch.nn.utils.get_total_norm(ref_grads).item()
        assert scalars["gradguard/grad_norm_clipped"][step] == pytest.approx(ref_norm, rel=2e-5)
        pre = scalars["gradguard/grad_norm"][step]
        clipped_steps += ref_norm < pre * (1 - 1e-6)
        if threshold is None:
            assert scalars["gradguard/clip_threshold"][step] >= pre * (1 - 1e-6)
        else:
            assert scalars["gradguard/clip_threshold"][step] == pytest.approx(threshold, rel=2e-5)
        assert scalars["gradguard/clip_coef"][step] == pytest.approx(ref_norm / pre, rel=2e-5)
    assert clipped_steps >= 3, "the stream must exercise the clipping, not only pass through"


def test_zscore_statistics_match_zclip_state(tmp_path):
    clipping = GradientClipping("zscore", warmup_steps=5, **REFERENCE_SAFE_START_OFF)
    before = Snapshot()
    fit(tmp_path, clipping, before=[Faults(grads=SPIKES), before])
    zclip = ZClip(mode="zscore", warmup_steps=5, max_grad_norm=None)
    for step in sorted(before.grads):
        zclip.step(_holder(before.grads[step]))
    ema = clipping.state_dict()["clippers"][0]["rule"]["ema"]
    assert ema["mean"].item() == pytest.approx(zclip.mean, rel=1e-5)
    assert ema["var"].item() == pytest.approx(zclip.var, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# better where the references are wrong
# ---------------------------------------------------------------------------------------------------------------

ALL_METHODS = {
    "auto": {"method": "auto"},
    "zscore": {"method": "zscore", "warmup_steps": 6},
    "quantile": {"method": "quantile", "warmup_steps": 6},
    "adagc": {"method": "adagc", "warmup_steps": 6},
    "agc": {"method": "agc", "agc_exclude": ()},
    "norm": {"method": "norm", "max_norm": 1.0},
    "value": {"method": "value", "clip_value": 0.05},
}


def assert_statistics_clean(state: dict) -> None:
    """No NaN or Inf was ever written into a window, an EMA or a per-tensor EMA."""
    for key, part in state.items():
        if key == "warmup":
            assert_statistics_clean(part)
        elif key in ("history", "window", "evidence"):  # empty slots are NaN; filled ones must be finite
            filled = int(min(part["count"].item(), part["values"].numel()))
            assert int(torch.isfinite(part["values"]).sum()) == filled, key
        elif key == "ema":
            assert math.isfinite(part["mean"].item()) and math.isfinite(part["var"].item())
        elif key == "gamma":
            assert not torch.isnan(part).any()
        elif key == "mean":  # "auto"'s EMA
            assert math.isfinite(part.item())


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_nonfinite_steps_are_left_alone_and_a_later_spike_is_clipped_without_host_sync(tmp_path, method):
    """NaN at step 12, Inf at step 14, a 1000x spike at step 17: the non-finite steps keep coefficient 1, nothing
    finite becomes non-finite, the statistics stay clean, the spike is clipped; no host sync in any step."""
    events = {12: "nan", 14: "inf", 17: 1000.0}
    before, after = Snapshot(), Snapshot()
    clipping = counting(GradientClipping)(**ALL_METHODS[method])
    scalars, model, _ = fit(
        tmp_path, clipping, before=[Faults(grads=events), before], after=[after, DropNonFinite()], max_steps=20
    )
    assert clipping.syncs["step"] == [0] * 20
    coef, threshold = scalars["gradguard/clip_coef"], scalars["gradguard/clip_threshold"]
    for step in (12, 14):
        assert coef[step] == 1.0
        for a, b in zip(after.grads[step], before.grads[step]):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
            assert torch.equal(a[torch.isfinite(a)], b[torch.isfinite(b)])
    for step, grads in after.grads.items():
        if step not in (12, 14):
            assert all(torch.isfinite(g).all() for g in grads), f"step {step} made non-finite"
    # "auto" has no threshold before its first finite norm (unless a cap is on)
    assert all(math.isfinite(v) for step, v in threshold.items() if step > 0 or method != "auto")
    if method == "value":
        assert max(g.abs().max().item() for g in after.grads[17]) <= 0.05 * (1 + 1e-6)
    else:
        assert coef[17] < 0.02, "the spike after the non-finite steps must be clipped"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_statistics_clean(clipping.state_dict()["clippers"][0]["rule"])


def test_nan_poisons_zclip_but_not_zscore(tmp_path):
    """The same stream through zclip: its EMA turns NaN and the later spike passes; ours clips it."""
    events = {12: "nan", 17: 1000.0}
    before = Snapshot()
    clipping = GradientClipping("zscore", warmup_steps=5, **REFERENCE_SAFE_START_OFF)
    scalars, _, _ = fit(
        tmp_path, clipping, before=[Faults(grads=events), before], after=[DropNonFinite()], max_steps=20
    )
    zclip = replay_zclip(before, warmup_steps=5, max_grad_norm=None)
    spike_norm = torch.nn.utils.get_total_norm(zclip[17][1]).item()
    assert spike_norm == pytest.approx(scalars["gradguard/grad_norm"][17], rel=1e-5), "zclip let the spike through"
    assert scalars["gradguard/clip_coef"][17] < 0.02
    ema = clipping.state_dict()["clippers"][0]["rule"]["ema"]
    assert math.isfinite(ema["mean"].item()) and math.isfinite(ema["var"].item())


@pytest.mark.parametrize("method", ["zscore", "quantile", "adagc"])
@pytest.mark.parametrize("spike_step", [1, 2, 3])
def test_safe_start_clips_an_early_spike(tmp_path, method, spike_step):
    scalars, _, _ = fit(
        tmp_path,
        GradientClipping(method),
        before=[Faults(grads={spike_step: 1000.0})],
        max_steps=spike_step + 1,
    )
    norms = scalars["gradguard/grad_norm"]
    assert norms[spike_step] > 100 * max(norms[s] for s in range(spike_step))
    assert scalars["gradguard/clip_coef"][spike_step] < 0.01
    assert scalars["gradguard/grad_norm_clipped"][spike_step] <= 3.0 * max(norms[s] for s in range(spike_step)) + 1e-6


def test_first_step_is_clipped_at_warmup_threshold_and_zclip_lets_early_spikes_through(tmp_path):
    before = Snapshot()
    scalars, _, _ = fit(
        tmp_path,
        GradientClipping("zscore", warmup_threshold=0.1),
        before=[Faults(grads={0: 1000.0, 2: 1000.0}), before],
        max_steps=3,
    )
    assert scalars["gradguard/clip_threshold"][0] == pytest.approx(0.1)
    assert scalars["gradguard/grad_norm_clipped"][0] == pytest.approx(0.1, rel=1e-5)
    assert scalars["gradguard/clip_coef"][2] < 0.01
    # ZClip without its absolute cap clips nothing during its warm-up
    reference = replay_zclip(before, max_grad_norm=None)
    assert all(threshold is None for threshold, _ in reference)


def test_safe_start_holds_huge_first_gradients_until_they_come_down():
    """Functional: norms that start at 500 and settle at 0.5 are clipped at ``warmup_threshold`` until they come
    down, and the rule then follows the settled norms; norms that stay at 50 through the warm-up stay clipped near
    1.0 (as with ZClip's default absolute cap), unless the safe start is turned off."""
    param = nn.Parameter(torch.zeros(4))

    def run(norms, **kwargs):
        clipper = GradientClipper("zscore", warmup_steps=6, **kwargs)
        out = []
        for norm in norms:
            param.grad = torch.full((4,), norm / 2.0)  # L2 norm of 4 equal entries: 2 * entry
            out.append(clipper.clip_([param]))
        return [r.threshold.item() for r in out], [r.clipped_norm.item() for r in out]

    thresholds, clipped = run([500.0, 300.0, 100.0, 0.1, 0.2, 0.4] + [0.5] * 10)
    assert thresholds[:4] == [1.0] * 4 and clipped[:3] == pytest.approx([1.0] * 3)
    assert thresholds[4:6] == pytest.approx([0.3, 0.3])  # 3 x lower median of (0.1), (0.1, 0.2)
    # ZClip from the clipped warm-up norms: a settled norm of 0.5 is no longer clipped
    assert clipped[6:] == pytest.approx([0.5] * 10)
    held, _ = run([50.0] * 40)
    assert held == pytest.approx([1.0] * 40, rel=1e-3)
    free, clipped = run([50.0] * 40, warmup_threshold=math.inf)
    assert clipped == pytest.approx([50.0] * 40), "without an absolute start, large steady norms pass"


# ---------------------------------------------------------------------------------------------------------------
# AGC and AdaGC specifics
# ---------------------------------------------------------------------------------------------------------------


class ConvClassifier(TinyMLP):
    """A conv layer (3-D weight), a zero-initialised hidden layer and a classifier head named ``head``."""

    def __init__(self):
        super().__init__(width=8, lr=0.5)
        del self.net
        with torch.random.fork_rng():  # the same layers whatever the tests before drew from the global generator
            torch.manual_seed(0)
            self.conv = nn.Conv1d(1, 2, 3)
            self.hidden = nn.Linear(12, 6)
            self.head = nn.Linear(6, 1)
        nn.init.zeros_(self.hidden.weight)
        # a positive bias keeps the ReLU open, so the zero weights get a gradient (which AGC must not zero)
        nn.init.constant_(self.hidden.bias, 0.1)

    def forward(self, x):
        h = self.conv(x.unsqueeze(1)).flatten(1)
        return self.head(torch.relu(self.hidden(h)) + 0.1)


def test_agc_excludes_the_head_keeps_zero_weights_learning_and_handles_conv(tmp_path):
    before, after = Snapshot(), Snapshot()
    scalars, model, _ = fit(
        tmp_path, GradientClipping("agc"), before=[before], after=[after], model=ConvClassifier(), max_steps=6
    )
    names = [n for n, _ in model.named_parameters()]
    clipped = [not n.startswith("head.") for n in names]
    for step in sorted(before.grads):
        module = _holder(before.grads[step], before.weights[step])
        timm_adaptive_clip_grad([p for p, c in zip(module.parameters(), clipped) if c])
        for name, ours, ref in zip(names, after.grads[step], module.parameters()):
            torch.testing.assert_close(ours, ref.grad, rtol=2e-5, atol=1e-9, msg=name)
        head = names.index("head.weight")
        assert torch.equal(after.grads[step][head], before.grads[step][head]), "the head is excluded"
    hidden = names.index("hidden.weight")
    assert torch.count_nonzero(before.weights[0][hidden]) == 0
    # the eps floor: the zero-initialised layer is clipped to 0.01 * 1e-3 per row, not to zero
    row_norms = after.grads[0][hidden].norm(dim=1)
    assert (row_norms > 0).any() and (row_norms <= 1e-5 * (1 + 1e-5)).all()
    assert model.hidden.weight.abs().sum() > 0, "zero-initialised weights must move"
    assert scalars["gradguard/clip_coef"][0] < 1.0


def adagc_port_clip(grads_stream, beta=0.98, lambda_abs=1.0, lambda_rel=1.05, warmup_steps=100, eps=1e-8):
    """The clipping half of the public AdaGC port (pytorch_optimizer's ``AdaGC.step``), for plain gradient lists."""
    gamma, out = None, []
    for step, grads in enumerate(grads_stream, start=1):
        if step < warmup_steps:
            h = min(lambda_abs / (torch.nn.utils.get_total_norm(grads).item() + eps), 1.0)
            clipped = [g * h for g in grads]
            norms = [c.norm() for c in clipped]
            gamma = norms if step == 1 else [min(a, b) for a, b in zip(gamma, norms)]
        else:
            clipped = [g * min(lambda_rel * y / g.norm(), 1.0) for g, y in zip(grads, gamma)]
            gamma = [beta * y + (1 - beta) * c.norm() for y, c in zip(gamma, clipped)]
        out.append(clipped)
    return out


def test_the_per_step_formulas_on_small_inputs():
    """The public one-step formulas, on values worked out by hand."""
    grads = [torch.ones(2), torch.ones(2, 2)]
    scale_(grads, torch.tensor(0.5))
    assert all(torch.equal(g, torch.full_like(g, 0.5)) for g in grads)
    scale_(grads, [torch.tensor(2.0), torch.tensor([[1.0], [4.0]])])  # one factor per tensor, broadcast over rows
    assert torch.equal(grads[0], torch.ones(2)) and torch.equal(grads[1], torch.tensor([[0.5, 0.5], [2.0, 2.0]]))
    values = [torch.tensor([-3.0, 0.5, 2.0])]
    clamp_(values, torch.tensor(1.0))
    assert torch.equal(values[0], torch.tensor([-1.0, 0.5, 1.0]))
    clamp_(values, torch.tensor(math.inf))  # an infinite bound leaves them alone
    assert torch.equal(values[0], torch.tensor([-1.0, 0.5, 1.0]))
    # a zero weight is floored at eps, so its unit still learns
    agc = agc_coefficients(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1e-3]), clip_factor=0.01)
    torch.testing.assert_close(agc, torch.tensor([1e-2, 1e-5, 1.0]))
    # a zero gradient and an unset (inf) gamma both give 1
    adagc = adagc_coefficients(torch.tensor([2.0, 0.5, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, math.inf]), 1.0)
    assert torch.equal(adagc, torch.tensor([0.5, 1.0, 1.0, 1.0]))


def test_adagc_matches_the_public_port_formula():
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6,), (3, 6), (3,)]
    stream = [
        [torch.randn(s, generator=gen) * (0.2 + 0.1 * i) * (8.0 if i in (9, 14) else 1.0) for s in shapes]
        for i in range(20)
    ]
    reference = adagc_port_clip(stream, lambda_abs=0.5, warmup_steps=6)
    # the port's warm-up is `step < warmup_steps` with steps counted from 1: 5 steps; its eps is added to the norm
    clipper = GradientClipper("adagc", warmup_steps=5, warmup_factor=None, warmup_threshold=0.5, eps=1e-8)
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    clipped_steps = 0
    for grads, expected in zip(stream, reference):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        result = clipper.clip_(params)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
        assert result.clipped_norm.item() == pytest.approx(torch.nn.utils.get_total_norm(expected).item(), rel=1e-5)
        clipped_steps += result.coef.item() < 1
    assert clipped_steps >= 5


def test_adagc_zero_gradient_does_not_freeze_a_tensor():
    """A tensor with a zero gradient during the warm-up keeps learning afterwards (the port would pin its gamma to
    0 and zero its gradient for good)."""
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))]
    clipper = GradientClipper("adagc", warmup_steps=3)
    for step in range(8):
        params[0].grad = torch.full((3,), 0.1)
        params[1].grad = torch.zeros(3) if step == 1 else torch.full((3,), 0.1)
        clipper.clip_(params)
    assert params[1].grad.norm().item() == pytest.approx(params[0].grad.norm().item())
    assert params[1].grad.norm().item() > 0.1
    port_stream = [[torch.full((3,), 0.1), torch.zeros(3)]] + [[torch.full((3,), 0.1)] * 2] * 7
    assert adagc_port_clip(port_stream, warmup_steps=4)[-1][1].norm().item() == 0.0, "the port freezes it"


# ---------------------------------------------------------------------------------------------------------------
# state and resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
@pytest.mark.parametrize("method", ["auto", "zscore", "quantile", "adagc"])
def test_resume_from_checkpoint_is_bitwise_identical(tmp_path, method, accelerator):
    """Stopped at step 9 and resumed from its checkpoint: the same thresholds, clipped norms and parameters as the
    uninterrupted run, bit for bit. One batch per epoch, so the data a step sees cannot depend on where Lightning
    restarts the epoch."""
    config = {"method": method, **({"warmup_steps": 4} if method != "auto" else {})}
    config.update({"history_length": 8} if method == "quantile" else {})
    events = Faults(grads={7: 20.0, 13: 30.0})

    def run(name, max_steps, ckpt_path=None):
        tb = TensorBoardLogger(tmp_path, name=name, version=0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=9, save_top_k=-1)
        trainer = tiny_trainer(
            tmp_path,
            max_steps=max_steps,
            callbacks=[events, GradientClipping(**config), checkpoint],
            logger=tb,
            enable_checkpointing=True,
            log_every_n_steps=5,
            accelerator=accelerator,
        )
        model = TinyMLP(lr=0.05, num_samples=8)
        trainer.fit(model, ckpt_path=ckpt_path)
        return read_scalars(tb.log_dir), model

    straight, model_straight = run("straight", 18)
    run("first", 9)
    resumed, model_resumed = run("resumed", 18, ckpt_path=str(next((tmp_path / "first").glob("*step=9.ckpt"))))
    for tag in ("gradguard/clip_threshold", "gradguard/grad_norm_clipped", "gradguard/clip_coef"):
        assert sorted(resumed[tag]) == list(range(9, 18))
        assert {s: straight[tag][s] for s in range(9, 18)} == resumed[tag], tag
    assert min(straight["gradguard/clip_coef"][s] for s in range(9, 18)) < 1, "clipping must be active after resume"
    for a, b in zip(model_straight.parameters(), model_resumed.parameters()):
        assert torch.equal(a, b)


def test_state_dict_round_trip_and_old_checkpoints():
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))]
    clipping = GradientClipping("adagc", warmup_steps=2)
    for i in range(4):
        for p in params:
            p.grad = torch.randn_like(p) * (i + 1)
        clipping.clipper(0).clip_(params, names=["w", "b"])
    state = clipping.state_dict()
    other = GradientClipping("adagc", warmup_steps=2)
    other.load_state_dict(state)
    assert _equal(other.state_dict()["clippers"], state["clippers"])
    restored = other.clipper(0).state_dict()
    assert _equal(restored, state["clippers"][0])
    for p in params:
        p.grad = torch.ones_like(p) * 100
    a = clipping.clipper(0).clip_(params, names=["w", "b"])
    for p in params:
        p.grad = torch.ones_like(p) * 100
    b = other.clipper(0).clip_(params, names=["w", "b"])
    assert torch.equal(a.threshold, b.threshold) and torch.equal(a.coef, b.coef)
    fresh = GradientClipping("adagc")
    fresh.load_state_dict({})  # a checkpoint from before this callback existed still loads
    assert fresh.state_dict()["clippers"] == {}
    with pytest.raises(ValueError, match="method 'zscore'"):
        GradientClipper("zscore").load_state_dict(state["clippers"][0])


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):  # NaN marks an empty window slot: equal where both are NaN
        return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
    return a == b


@pytest.mark.parametrize("nonfinite", [None, math.inf, math.nan])
def test_value_clipping_of_mixed_tensors_matches_torch(nonfinite):
    """``"value"`` clamps each tensor and takes the clipped norm in one pass over it (small tensors of one shape
    stacked, larger ones one by one, the largest by rows, float64 and bfloat16 in their own groups): the gradients equal
    ``clip_grad_value_``'s and the clipped norm is theirs. A step with a non-finite gradient is left untouched."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,)] * 4 + [(300, 40), (3, 5), (64,), (2, 3, 4), (520, 512)]  # the last: reduced by rows
    dtypes = [torch.float32] * 6 + [torch.float64, torch.bfloat16, torch.float32]
    params = [
        nn.Parameter((torch.randn(s, generator=gen) * 0.1 * (i + 1)).to(d))
        for i, (s, d) in enumerate(zip(shapes, dtypes))
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2
    if nonfinite is not None:
        params[4].grad[3, 5] = nonfinite
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    if nonfinite is None:
        torch.nn.utils.clip_grad_value_(copies, 0.1)
    expected = [c.grad for c in copies]
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params]))
    with HostSyncCounter() as counter:
        result = GradientClipper("value", clip_value=0.1).clip_(params)
    assert counter.total == 0, dict(counter.counts)
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e) if nonfinite is None else torch.equal(p.grad.nan_to_num(), e.nan_to_num())
    if nonfinite is None:  # torch's own norm of the clamped gradients, accumulated in float32 as ours is
        after = torch.nn.utils.get_total_norm([p.grad for p in params]).float()
        torch.testing.assert_close(result.clipped_norm, after, rtol=1e-6, atol=0)
        assert result.clipped_norm < result.total_norm
        torch.testing.assert_close(result.total_norm.double(), before, rtol=1e-5, atol=0)
    else:
        assert not torch.isfinite(result.total_norm) and result.coef.item() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# logging, charts, the shared norm
# ---------------------------------------------------------------------------------------------------------------


class CountingMonitor(GradientNormMonitor):
    """Counts the norm reads of the whole gradguard pipeline in each step (the monitor runs it)."""

    def __init__(self):
        super().__init__(layer_interval=None)
        self.reads: list[dict[str, int]] = []
        self.num_params = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self.num_params = len(params)
        with NormReadCounter([p.grad for p in params], [p.detach() for p in params]) as counter:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.reads.append(counter.reads)


@pytest.mark.parametrize("method", ["agc", "zscore"])
def test_logs_every_step_with_monitor_and_computes_the_norm_once(tmp_path, method):
    """Monitor and clipping together read every gradient once per step for norms (AGC: its row norms give the
    tensors' norms in the same read), and AGC reads every weight once."""
    monitor = CountingMonitor()
    scalars, _, trainer = fit(tmp_path, GradientClipping(method), before=[monitor], max_steps=12)
    n = monitor.num_params
    assert monitor.reads == [{"grad": n, "weight": n if method == "agc" else 0}] * 12
    for tag in ("grad_norm", "grad_norm_clipped", "clip_threshold", "clip_coef"):
        assert sorted(scalars[f"gradguard/{tag}"]) == list(range(12)), tag
    for step in range(12):
        norm, clipped = scalars["gradguard/grad_norm"][step], scalars["gradguard/grad_norm_clipped"][step]
        assert clipped == pytest.approx(norm * scalars["gradguard/clip_coef"][step], rel=1e-6)
        assert clipped <= scalars["gradguard/clip_threshold"][step] * (1 + 1e-6)
    layout = read_layout(trainer.logger.log_dir)["gradguard"]
    assert set(layout["gradient norm"]) == {
        r"gradguard/(opt\d+/)?grad_norm(_clipped)?$",
        r"gradguard/(opt\d+/)?clip_threshold$",
    }
    assert layout["clip coefficient"] == [r"gradguard/(opt\d+/)?clip_coef$"]


def test_logs_the_norm_itself_without_monitor(tmp_path):
    reference = Snapshot()
    scalars, _, _ = fit(tmp_path, GradientClipping("norm", max_norm=0.3), before=[reference], max_steps=5)
    for step, grads in reference.grads.items():
        expected = torch.nn.utils.get_total_norm(grads).item()
        assert scalars["gradguard/grad_norm"][step] == pytest.approx(expected, rel=1e-6)
    assert all(v == pytest.approx(0.3, rel=1e-5) for v in scalars["gradguard/grad_norm_clipped"].values())


class TwoOptimizers(TinyMLP):
    """Manual optimization, two optimizers over two halves of the network: each gets its own clipping statistics."""

    def __init__(self):
        super().__init__(lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        for opt in (first, second):
            loss = nn.functional.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        layers = list(self.net.children())
        head = [p for layer in layers[-2:] for p in layer.parameters()]
        body = [p for layer in layers[:-2] for p in layer.parameters()]
        return torch.optim.SGD(body, lr=0.05), torch.optim.SGD(head, lr=0.05)


def test_two_optimizers_get_their_own_statistics_and_tags(tmp_path):
    clipping = GradientClipping("quantile", warmup_steps=2)
    scalars, _, _ = fit(tmp_path, clipping, model=TwoOptimizers(), max_steps=12)
    assert "gradguard/clip_coef" not in scalars
    first, second = scalars["gradguard/opt0/clip_threshold"], scalars["gradguard/opt1/clip_threshold"]
    assert sorted(first) == sorted(second) == list(range(6)), "both optimizers step once per batch"
    state = clipping.state_dict()["clippers"]
    assert sorted(state) == [0, 1]
    assert state[0]["rule"]["history"]["count"].item() == len(first) == 6
    assert not torch.equal(state[0]["rule"]["history"]["values"], state[1]["rule"]["history"]["values"])


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_clip_val_as_well_is_refused_at_setup(tmp_path):
    trainer = tiny_trainer(tmp_path, callbacks=[GradientClipping()], gradient_clip_val=0.5)
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5.*GradientClipping.*clipped twice"):
        trainer.fit(TinyMLP())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "clip"}, ValueError, r"Expected `method` to be one of .* but got 'clip'"),
        ({"method": "norm"}, ValueError, r"Expected `max_norm` to be a positive number for method='norm' but got None"),
        ({"method": "value"}, ValueError, r"Expected `clip_value` to be a positive number for method='value'"),
        ({"max_norm": -1.0}, ValueError, r"Expected `max_norm` to be a number in \(0, inf\) but got -1.0"),
        ({"max_norm": "1"}, TypeError, r"Expected `max_norm` to be a number .* but got str '1'"),
        ({"method": "quantile", "quantile": 1.5}, ValueError, r"`quantile` to be a number in \(0, 1\] but got 1.5"),
        ({"method": "quantile", "history_length": 0}, ValueError, r"`history_length` to be an integer >= 1 but got 0"),
        ({"method": "zscore", "alpha": 1.0}, ValueError, r"Expected `alpha` to be a number in \(0, 1\) but got 1.0"),
        ({"method": "zscore", "z_thresh": 0}, ValueError, r"`z_thresh` to be a number in \(0, inf\) but got 0"),
        ({"method": "zscore", "zscore_mode": "median"}, ValueError, r"`zscore_mode` to be one of .* but got 'median'"),
        ({"method": "zscore", "warmup_steps": 0}, ValueError, r"`warmup_steps` to be an integer >= 1 but got 0"),
        ({"method": "zscore", "warmup_factor": 0.5}, ValueError, r"`warmup_factor` to be a number in \[1, inf\]"),
        ({"method": "adagc", "warmup_threshold": math.nan}, ValueError, r"Expected `warmup_threshold` .* but got nan"),
        ({"method": "agc", "agc_factor": 0}, ValueError, r"`agc_factor` to be a number in \(0, inf\) but got 0"),
        ({"method": "agc", "agc_exclude": "head"}, TypeError, r"`agc_exclude` to be a sequence of regular expressions"),
        ({"method": "agc", "agc_exclude": ["("]}, ValueError, r"`agc_exclude` to hold valid regular .*'\('"),
        ({"method": "adagc", "adagc_beta": 1.0}, ValueError, r"`adagc_beta` to be a number in \[0, 1\) but got 1.0"),
        # an argument of another method is an error, not ignored
        ({"method": "agc", "clip_value": 0.1}, ValueError, r"`clip_value` applies to method=value only but got"),
        ({"method": "agc", "quantile": 0.5}, ValueError, r"`quantile` applies to method=quantile only .* method='agc'"),
        ({"method": "norm", "max_norm": 1.0, "warmup_steps": 5}, ValueError, r"`warmup_steps` applies to method=quant"),
        ({"method": "quantile", "alpha": 0.9}, ValueError, r"`alpha` applies to method=auto/zscore only"),
        ({"spike_factor": 0.5}, ValueError, r"Expected `spike_factor` to be a number in \[1, inf\) but got 0.5"),
        ({"method": "zscore", "explosion_cap": 1.0}, ValueError, r"`explosion_cap` applies to method=auto only"),
        ({"method": "zscore", "agc_exclude": ["head"]}, ValueError, r"`agc_exclude` applies to method=agc only"),
        ({"method": "value", "clip_value": 1, "adagc_beta": 0.9}, ValueError, r"`adagc_beta` applies to method=adagc"),
        ({"flush_interval": 0}, ValueError, r"Expected `flush_interval` to be a positive integer or None but got 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientClipping(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# clipping that acts on most steps; AGC's output layer
# ---------------------------------------------------------------------------------------------------------------


def _auto_step(clipper: GradientClipper, weights: list[torch.Tensor], grads: list[torch.Tensor], optimizer) -> Any:
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    return clipper.clip_(weights, optimizer=optimizer)


def test_auto_caps_from_the_first_sgd_step_that_would_move_a_weight_by_twice_its_norm():
    """The default's explosion cap latches on the step of one weight matrix, with the learning rate in force."""
    big, small = nn.Parameter(torch.full((4, 4), 10.0)), nn.Parameter(torch.full((2, 2), 0.5))  # norms 40 and 1
    optimizer = torch.optim.SGD([big, small], lr=1.0)
    clipper = GradientClipper()
    # small's step is 1.5 x its norm (the whole model's, 1.5 / 40): no cap, and the first norm passes unclipped
    first = _auto_step(clipper, [big, small], [torch.zeros(4, 4), torch.full((2, 2), 0.75)], optimizer)
    assert math.isinf(first.threshold.item()) and first.coef.item() == 1.0
    # 2.5 x its norm: capped at 1.0 from this step on, also once the steps are small again
    second = _auto_step(clipper, [big, small], [torch.zeros(4, 4), torch.full((2, 2), 1.25)], optimizer)
    assert second.threshold.item() == 1.0 and second.clipped_norm.item() == pytest.approx(1.0)
    third = _auto_step(clipper, [big, small], [torch.zeros(4, 4), torch.full((2, 2), 0.1)], optimizer)
    assert third.threshold.item() == 1.0 and third.coef.item() == 1.0
    # the learning rate in force: the same gradient at lr 0.5 (a scheduler's cut) does not latch a fresh clipper
    optimizer.param_groups[0]["lr"] = 0.5
    fresh = _auto_step(GradientClipper(), [big, small], [torch.zeros(4, 4), torch.full((2, 2), 1.25)], optimizer)
    assert math.isinf(fresh.threshold.item())


@pytest.mark.parametrize("case", ["zero_init", "vector", "adam", "other_group"])
def test_auto_does_not_cap_where_a_large_step_is_no_explosion(case):
    """Zero-initialised weights (nothing to compare the step with), vectors (biases, norm scales), Adam (its step is
    not ``lr * g``), and a weight whose own group has a small learning rate."""
    weight = nn.Parameter(torch.zeros(3, 3) if case == "zero_init" else torch.ones(3, 3))
    vector = nn.Parameter(torch.full((3,), 0.1))
    grads = [torch.full((3, 3), 100.0 if case != "vector" else 0.0), torch.full((3,), 100.0)]
    if case == "adam":
        optimizer = torch.optim.Adam([weight, vector], lr=1.0)
    elif case == "other_group":
        optimizer = torch.optim.SGD([{"params": [weight], "lr": 1e-3}, {"params": [vector], "lr": 1.0}])
    else:
        optimizer = torch.optim.SGD([weight, vector], lr=1.0)
    clipper = GradientClipper()
    for _ in range(3):
        result = _auto_step(clipper, [weight, vector], grads, optimizer)
    assert math.isinf(result.threshold.item()) or result.threshold.item() > 1.0


@pytest.mark.parametrize("max_norm, persistent", [(1e-4, True), (1e6, False)])
def test_persistent_clipping_warns_once_and_records_an_event(tmp_path, max_norm, persistent):
    """A healthy run clipped on every step (a threshold far below its norms) gets one warning and one
    ``persistent_clipping`` event; the same run with a threshold it never reaches gets neither."""
    import warnings

    from lightning_gradguard.events import read_jsonl

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, trainer = fit(tmp_path, GradientClipping("norm", max_norm=max_norm), max_steps=130)
    messages = [str(w.message) for w in caught if "acts as a learning-rate cut" in str(w.message)]
    path = tmp_path / "tb" / "version_0" / "gradguard_events.jsonl"
    events = read_jsonl(path) if path.exists() else []
    if persistent:
        assert len(messages) == 1 and "on 100 of the last 100 steps" in messages[0]
        assert [(e.kind, e.step) for e in events] == [("persistent_clipping", 99)]
    else:
        assert messages == [] and events == []


class OutLayer(TinyMLP):
    """The output layer is named ``out`` (a name no list of usual head names is sure to have)."""

    def __init__(self):
        super().__init__()
        self.out = self.net[-1]
        self.net = self.net[:-1]

    def forward(self, x):
        return self.out(self.net(x))


@pytest.mark.parametrize(
    ("model", "exclude", "left_alone", "warns"),
    [
        (OutLayer, None, {"out.weight", "out.bias"}, False),
        (TinyMLP, None, {"net.6.weight", "net.6.bias"}, True),  # a Sequential index: named in a warning
        (TinyMLP, (), set(), False),
        (TinyMLP, [r"^net\.0\."], {"net.0.weight", "net.0.bias"}, False),
    ],
    ids=["named-out", "sequential-index", "none", "explicit"],
)
def test_agc_leaves_the_output_layer_alone(tmp_path, model, exclude, left_alone, warns):
    import warnings

    before, after = Snapshot(), Snapshot()
    config = {"method": "agc", "agc_factor": 1e-4, **({} if exclude is None else {"agc_exclude": exclude})}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, module, _ = fit(
            tmp_path, GradientClipping(**config), before=[before], after=[after], model=model(), max_steps=3
        )
    names = [n for n, p in module.named_parameters()]
    untouched = {n for i, n in enumerate(names) if torch.equal(before.grads[2][i], after.grads[2][i])}
    assert untouched == left_alone
    warned = [str(w.message) for w in caught if "leaves the output layer" in str(w.message)]
    assert bool(warned) == warns and (not warns or "`net.6`" in warned[0])
