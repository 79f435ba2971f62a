"""The per-step path on a CUDA device: no host synchronisation, checked by CUDA itself.

``torch.cuda.set_sync_debug_mode("error")`` makes every operation that synchronises the device with the host raise
(``.item()``, ``nonzero``, a blocking device-to-host copy, ...). The gradguard pipeline of one optimizer step runs
under it inside a real ``Trainer.fit`` on the GPU, for every clipping method, the guard in its observing mode and
the quantizer; the flush, whose one deliberate host read is its job, runs outside it. Skipped without CUDA
(``scripts/gpu_check.sh`` runs this file on a GPU machine).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lightning_gradguard import (
    ExplosionGuard,
    GradientClipping,
    GradientNormMonitor,
    GradientQuantization,
)
from lightning_gradguard.functional import GradientClipper, GradientQuantizer, grad_norms, unit_norms
from tests.helpers.models import TinyMLP, tiny_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def no_device_sync():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _grads(dtypes, device="cuda"):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (7,), (3, 5, 2), (1,), (128, 128)]
    return [
        (torch.randn(s, generator=gen) * 10.0 ** (i % 3 - 1)).to(device, dtype)
        for i, s in enumerate(shapes * 2)
        for dtype in [dtypes[i % len(dtypes)]]
    ]


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norms_on_the_gpu_match_the_cpu_without_a_sync(norm_type):
    grads = _grads([torch.float32, torch.bfloat16, torch.float16])
    with no_device_sync():
        per_tensor, total = grad_norms(grads, norm_type)
        units = unit_norms(grads)
    torch.cuda.synchronize()
    cpu_per_tensor, cpu_total = grad_norms([g.cpu() for g in grads], norm_type)
    torch.testing.assert_close(per_tensor.cpu(), cpu_per_tensor, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.cpu(), cpu_total, rtol=1e-5, atol=0)
    torch.testing.assert_close(units.per_tensor.cpu(), grad_norms([g.cpu() for g in grads])[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["auto", "norm", "value", "quantile", "zscore", "agc", "adagc"])
def test_functional_clipper_on_the_gpu_without_a_sync(method):
    kwargs = {"max_norm": 1.0} if method == "norm" else {"clip_value": 0.01} if method == "value" else {}
    clipper = GradientClipper(method, **kwargs)
    params = [torch.nn.Parameter(torch.randn(32, 16, device="cuda")) for _ in range(3)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(30):
        for p in params:
            p.grad = torch.randn_like(p) * (100.0 if step == 20 else 1.0)
        with no_device_sync():
            result = clipper.clip_(params, names=[f"w{i}" for i in range(3)], optimizer=optimizer)
        assert result.clipped_norm.device.type == "cuda"
    coef = result.coef.item()  # test-side read
    assert 0.0 < coef <= 1.0 and result.threshold.device.type == "cuda"


@pytest.mark.parametrize("method", ["value", "agc", "adagc"])
def test_clipping_on_the_gpu_matches_the_cpu_without_a_sync(method):
    """The same gradients and statistics on the GPU as on the CPU, step after step, NaN step included, no sync."""
    kwargs = {"clip_value": 0.5} if method == "value" else {"warmup_steps": 1} if method == "adagc" else {}
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16), (16,), (32, 16), (16,), (32, 16), (16,), (3, 4, 4), (3, 4, 4), (3, 4, 4), (5,)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    runs = {}
    for device in ("cpu", "cuda"):
        clipper = GradientClipper(method, **kwargs)
        params = [torch.nn.Parameter(w.to(device)) for w in weights]
        gen = torch.Generator().manual_seed(1)
        out = []
        for step in range(12):
            for p, s in zip(params, shapes):
                p.grad = (torch.randn(s, generator=gen) * (100.0 if step == 8 else 1.0)).to(device)
            if step == 5:
                params[2].grad[0, 0] = float("nan")
            with no_device_sync() if device == "cuda" else contextlib.nullcontext():
                result = clipper.clip_(params)
            out.append(([p.grad.cpu() for p in params], [v.cpu() for v in result]))
        runs[device] = out
    for (cpu_grads, cpu_result), (gpu_grads, gpu_result) in zip(runs["cpu"], runs["cuda"]):
        for a, b in zip(cpu_grads + cpu_result, gpu_grads + gpu_result):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_quantizer_on_the_gpu_is_unbiased_and_sync_free():
    quantizer = GradientQuantizer(method="stochastic", bits=4, block_size=256)
    grad = torch.randn(4096, device="cuda")
    total = torch.zeros_like(grad)
    draws = 200
    for step in range(draws):
        g = grad.clone()
        with no_device_sync():
            quantizer.quantize_([g], step, names=["g"])
        total += g
    mean_error = (total / draws - grad).abs().mean().item()
    assert mean_error < 0.05, mean_error


class SyncFreeStep:
    """Mixin: the callback's per-step hook (the whole gradguard pipeline when it runs first) under sync errors."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with no_device_sync():
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


def _sync_free(cls):
    return type(f"SyncFree{cls.__name__}", (SyncFreeStep, cls), {})


@pytest.mark.parametrize("method", ["auto", "agc", "zscore", "quantile", "adagc", "norm"])
def test_fit_on_the_gpu_has_no_sync_in_the_per_step_path(tmp_path, method):
    from lightning.pytorch.loggers import TensorBoardLogger

    kwargs = {"max_norm": 1.0} if method == "norm" else {}
    callbacks = [
        _sync_free(GradientNormMonitor)(layer_interval=5, histogram_interval=10),
        _sync_free(ExplosionGuard)(on_nonfinite="log", on_spike="log"),
        _sync_free(GradientClipping)(method, **kwargs),
        _sync_free(GradientQuantization)(method="stochastic", bits=8),
    ]
    trainer = tiny_trainer(
        tmp_path,
        accelerator="cuda",
        max_steps=40,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path),
        log_every_n_steps=10,
    )
    model = TinyMLP()
    trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 40


def test_bf16_mixed_on_the_gpu(tmp_path):
    monitor = _sync_free(GradientNormMonitor)()
    trainer = tiny_trainer(tmp_path, accelerator="cuda", precision="bf16-mixed", max_steps=10,
                           callbacks=[monitor, _sync_free(GradientClipping)()])
    model = TinyMLP()
    trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_host_to_device_copies_do_not_wait_for_the_gpu():
    from lightning_gradguard.utilities import to_device

    busy = torch.randn(4096, 4096, device="cuda")
    with no_device_sync():
        busy @ busy  # queued work the copy must not wait for
        moved = to_device(torch.arange(5.0), "cuda")
    assert moved.device.type == "cuda" and moved.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_skip_on_the_device_with_a_fused_optimizer_has_no_sync(tmp_path):
    class Fused(TinyMLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    guard = _sync_free(ExplosionGuard)(on_nonfinite="skip", on_spike="skip")
    trainer = tiny_trainer(tmp_path, accelerator="cuda", max_steps=12, callbacks=[guard])
    model = Fused()
    trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
