"""GradientQuantization: low-bit gradients with error feedback, identical across ranks, sync-free."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_gradguard.callbacks.base import TAG_PREFIX, GradGuardCallback, GradStep
from lightning_gradguard.functional.quantization import GradientQuantizer, Method, Rounding

__all__ = ["GradientQuantization"]


class GradientQuantization(GradGuardCallback):
    r"""Quantize the gradients to a few bits before every optimizer step, optionally with error feedback.

    Simulates the gradient compression of communication-efficient training (what reaches the optimizer is exactly
    what a low-bit all-reduce would deliver) and bounds the largest gradient element on the way. It runs after
    :class:`~lightning_gradguard.GradientClipping` when both are attached, on the gradients after accumulation and
    AMP unscaling; under DDP on the averaged gradients, under FSDP2 on each rank's local shard.

    Methods (the math is :class:`~lightning_gradguard.functional.quantization.GradientQuantizer`):

    - ``"stochastic"``: k-bit stochastic rounding (``bits`` 2 to 8), one scale (the largest ``|g|``) per block of
      ``block_size`` elements; unbiased.
    - ``"qsgd"``: QSGD with ``levels`` levels, scaled by the L2 norm of each block; unbiased.
    - ``"terngrad"``: per-tensor clip to ``+-2.5 sigma`` then stochastic ternarisation; unbiased on the clipped
      gradient.
    - ``"sign"``: scaled sign (``mean |p| * sign(p)`` per tensor) with error feedback, always on.

    ``error_feedback=True`` carries the residual ``p - Q(p)`` to the next step for any method. ``clamp_sigma`` or
    ``clamp_quantile`` bound ``|g|`` per tensor before quantizing: the quantizer's guard against explosions, so one
    huge element cannot flatten a whole block to zero (what is clamped is dropped, not fed back).

    Random draws come from a generator seeded with ``(seed, global step)`` on every rank (plus the shard coordinate
    under FSDP2), so replicated parameters stay bitwise identical across DDP ranks and a resumed run reproduces an
    uninterrupted one. The residuals and the seed are in ``state_dict`` (under FSDP2 the residual shards are
    gathered into full tensors there, a collective that Lightning runs on every rank when it saves). A tensor with a
    NaN or Inf gradient is left untouched and neither consumes nor updates its residual. Nothing in the step reads a
    device value on the host. Error feedback needs ``rel_error`` well below 1 (8 and 4 bits, sign): at 2 bits or
    with terngrad the residual grows instead of shrinking.
    Memory: about three float32 copies of the gradients (two in the block layout, one dither table; four with error
    feedback) are kept between steps.

    Logged tags (``gradguard/opt<i>/...`` with several optimizers), every optimizer step through the buffered flush:

    - ``gradguard/quant/rel_error``: ``||Q(p) - p|| / ||p||``, ``p`` the quantizer's input (gradient plus
      residual, after the outlier bound), over the tensors that were quantized.
    - ``gradguard/quant/clamped``: fraction of elements clamped by the outlier bound (0 without one).

    With a ``TensorBoardLogger`` both appear in a "quantization" chart of the custom-scalars layout.

    Args:
        method: ``"stochastic"``, ``"qsgd"``, ``"terngrad"`` or ``"sign"``.
        bits: code width of ``"stochastic"``, 2 to 8.
        levels: levels of ``"qsgd"``; default ``2**(bits-1) - 1``.
        block_size: elements per block (scale block of ``"stochastic"``, norm bucket of ``"qsgd"``).
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"`` (deterministic).
        error_feedback: carry the quantization residual to the next step; default on for ``"sign"`` only.
        clamp_sigma: bound ``|g|`` per tensor at this many root-mean-squares (default 2.5 for ``"terngrad"``).
        clamp_quantile: bound ``|g|`` per tensor at this quantile of ``|g|``, in ``(0, 1]``.
        seed: base seed of the random draws (the same on every rank).
        flush_interval: optimizer steps between writes to the loggers; default: ``log_every_n_steps``.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or out of range (in ``__init__``).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> quantization = GradientQuantization("stochastic", bits=8, error_feedback=True)
        >>> trainer = Trainer(callbacks=[quantization], logger=False, enable_progress_bar=False)
    """

    stage = 30

    def __init__(
        self,
        method: Method = "stochastic",
        bits: int = 8,
        levels: Optional[int] = None,
        block_size: int = 2048,
        rounding: Rounding = "stochastic",
        error_feedback: Optional[bool] = None,
        clamp_sigma: Optional[float] = None,
        clamp_quantile: Optional[float] = None,
        seed: int = 0,
        flush_interval: Optional[int] = None,
    ) -> None:
        super().__init__(flush_interval=flush_interval)
        self.quantizer = GradientQuantizer(
            method,
            bits=bits,
            levels=levels,
            block_size=block_size,
            rounding=rounding,
            error_feedback=error_feedback,
            clamp_sigma=clamp_sigma,
            clamp_quantile=clamp_quantile,
            seed=seed,
        )

    @property
    @override
    def state_key(self) -> str:
        # the residuals are stored per tensor in full shapes: they stay valid if bits or block size change on resume
        return self._generate_state_key(method=self.quantizer.method)

    @override
    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.gradient_clip_val:
            rank_zero_warn(
                "GradientQuantization: `Trainer(gradient_clip_val=...)` clips after the gradients were quantized,"
                " rescaling the quantized values. Attach `GradientClipping` instead to clip before quantizing."
            )

    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        stats = self.quantizer.quantize_(step.grads, step.global_step, names=step.names, stream=step.optimizer_idx)
        step.log("quant/rel_error", stats.rel_error)
        step.log("quant/clamped", stats.clamped_fraction)

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"quantization": [rf"{TAG_PREFIX}/(opt\d+/)?quant/.*"]}

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.quantizer.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.quantizer.load_state_dict(state_dict)
