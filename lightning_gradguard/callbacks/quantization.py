"""GradientQuantization: low-bit gradients with error feedback, identical across ranks, sync-free."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_gradguard.callbacks._lightning import classes, ddp_comm_hook
from lightning_gradguard.callbacks.base import TAG_PREFIX, GradGuardCallback, GradStep
from lightning_gradguard.callbacks.guard import ExplosionGuard
from lightning_gradguard.functional.communication import QuantizedCommState, quantized_allreduce_hook
from lightning_gradguard.functional.quantization import GradientQuantizer, Method, Rounding

__all__ = ["GradientQuantization"]


class GradientQuantization(GradGuardCallback):
    r"""Quantize the gradients to a few bits with optional error feedback: after they are ready for the optimizer
    step, or under DDP in the gradient all-reduce itself (``compress_communication=True``).

    By default the gradients the optimizer gets, after accumulation, AMP unscaling and
    :class:`~lightning_gradguard.GradientClipping` (under DDP averaged, under FSDP2 each local shard), go through
    :class:`~lightning_gradguard.functional.quantization.GradientQuantizer` (formulas there): replicas draw alike, a
    resumed run reproduces an uninterrupted one, a tensor with a NaN or Inf is left untouched, no host reads. Error
    feedback needs ``rel_error`` well below 1 (8 and 4 bits, sign). The seed and the residuals (a float32 copy of the
    gradients) are in ``state_dict``, under FSDP2 gathered on every rank.

    Compressed, it registers :func:`~lightning_gradguard.functional.communication.quantized_allreduce_hook` at fit
    start (DDP, any backend): about ``32 / bits`` times fewer bytes than float32 DDP, worth it where the network bounds
    the step. Its error feedback is per rank (default on for sign and 4 bits or more; two float32 copies of the
    gradients). A rank's own NaN or Inf is named in the guard's event; a skipped step is undone, a rewind restores the
    residuals of its snapshot. ``state_dict`` gathers every rank's residuals to rank 0 (a collective); each rank loads
    its own at fit start, and another world size or bucket layout warns and restarts error feedback from zero.

    Tags, every optimizer step (``gradguard/opt<i>/...`` with several optimizers), in the "quantization" and
    "communication" custom-scalars charts: ``gradguard/quant/rel_error`` (``||Q(p) - p|| / ||p||``, ``p`` the
    quantizer's input; compressed: the first hop's), ``gradguard/quant/clamped`` (fraction clamped by the outlier
    bound; after-step only), ``gradguard/comm/bytes`` and ``gradguard/comm/ratio`` (compressed only: bytes this rank
    sent, and how many times fewer than a float32 ring all-reduce).

    Args:
        method: ``"stochastic"``, ``"qsgd"``, ``"terngrad"`` or ``"sign"``.
        bits: code width of ``"stochastic"``, 2 to 8 (default 8); for ``"qsgd"`` the default of ``levels``.
        levels: levels of ``"qsgd"``; default ``2**(bits-1) - 1``.
        block_size: elements per block (scale block of ``"stochastic"``, norm bucket of ``"qsgd"``).
        rounding: ``"stochastic"`` (unbiased, the default) or ``"nearest"``; not for ``"sign"``.
        error_feedback: carry ``p - Q(p)`` to the next step; default on for ``"sign"`` only (compressed: see above).
        clamp_sigma: bound ``|g|`` per tensor at this many root-mean-squares (default 2.5 for ``"terngrad"``).
        clamp_quantile: bound ``|g|`` per tensor at this quantile of ``|g|``, in ``(0, 1]``.
        seed: base seed of the random draws (the same on every rank).
        compress_communication: quantize in DDP's gradient all-reduce instead of after it.
        flush_interval: optimizer steps between writes to the loggers; default: ``log_every_n_steps``.

    Raises:
        TypeError, ValueError: bad arguments (``__init__``); compression without DDP or beside a ``ddp_comm_hook``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> quantization = GradientQuantization("stochastic", bits=8, error_feedback=True)
        >>> trainer = Trainer(callbacks=[quantization], logger=False, enable_progress_bar=False)
        >>> compressed = GradientQuantization("stochastic", bits=8, compress_communication=True)  # strategy="ddp"
    """

    stage = 30

    def __init__(self, method: Method = "stochastic", bits: Optional[int] = None, levels: Optional[int] = None,
                 block_size: int = 2048, rounding: Optional[Rounding] = None, error_feedback: Optional[bool] = None,
                 clamp_sigma: Optional[float] = None, clamp_quantile: Optional[float] = None, seed: int = 0,
                 compress_communication: bool = False, flush_interval: Optional[int] = None) -> None:
        super().__init__(flush_interval=flush_interval)
        if not isinstance(compress_communication, bool):
            kind = type(compress_communication).__name__
            raise TypeError(f"Expected `compress_communication` to be a bool but got {kind}")
        self.method = method
        self.compress_communication = compress_communication
        self.quantizer: Optional[GradientQuantizer] = None
        self.communication: Optional[QuantizedCommState] = None  # the hook's state, from fit start
        self._loaded: Optional[dict[str, Any]] = None  # a loaded checkpoint entry, taken at fit start
        self._rewind_residuals: Optional[dict[str, Any]] = None  # those of the guard's snapshot
        if not compress_communication:
            self.quantizer = GradientQuantizer(method, bits, levels, block_size, rounding, error_feedback, clamp_sigma,
                                               clamp_quantile, seed)
            return
        for name, value in (("rounding", rounding), ("clamp_sigma", clamp_sigma), ("clamp_quantile", clamp_quantile)):
            if value is not None:
                raise ValueError(f"`{name}` does not apply with compress_communication=True (the hook rounds"
                                 f" stochastically and bounds no outliers): expected None but got {name}={value!r}")
        self._comm_args = dict(method=method, bits=bits, levels=levels, block_size=block_size,
                               error_feedback=error_feedback, seed=seed)
        QuantizedCommState(**self._comm_args)  # checks the arguments now rather than at fit start

    @property
    @override
    def state_key(self) -> str:
        # after-step residuals are kept per tensor in full shapes, valid if bits or block size change on resume; the
        # per-rank residuals of compressed communication are another state, under another key
        if self.compress_communication:
            return self._generate_state_key(method=self.method, compress_communication=True)
        return self._generate_state_key(method=self.method)

    @override
    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if self.compress_communication and not isinstance(strategy, classes("strategies", "DDPStrategy")):
            raise ValueError("Expected DDPStrategy (strategy='ddp') with `compress_communication=True`, whose DDP"
                             f" gradient all-reduce it replaces, but the strategy is {type(strategy).__name__}. FSDP2"
                             " and single devices have no DDP communication to compress: use"
                             " `compress_communication=False` there.")
        hook = ddp_comm_hook(strategy) if self.compress_communication else None
        if hook is not None:
            raise ValueError("`compress_communication=True` registers its own DDP communication hook, but"
                             f" `DDPStrategy(ddp_comm_hook={getattr(hook, '__name__', 'hook')})` gives another: DDP"
                             " takes one hook, so expected one of the two.")
        if trainer.gradient_clip_val and not self.compress_communication:
            rank_zero_warn("GradientQuantization: `Trainer(gradient_clip_val=...)` clips after the gradients were"
                           " quantized, rescaling the quantized values. Attach `GradientClipping` instead to clip"
                           " before quantizing.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self.compress_communication:
            return
        self.communication = QuantizedCommState(**self._comm_args)
        trainer.strategy.model.register_comm_hook(self.communication, quantized_allreduce_hook)
        self.pipeline.communication = self.communication
        self._rewind_residuals = None
        ranks, rank = (self._loaded or {}).get("ranks") or [], trainer.global_rank
        if ranks:  # a rank with no entry (a larger world) gets the saved world size: a warning and a reset
            self.communication.load_state_dict(ranks[rank] if rank < len(ranks) else {"world_size": len(ranks)})
        self._loaded = None

    @override
    def process_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: GradStep) -> None:
        if self.communication is not None:  # the hook quantized the gradients in the all-reduce
            self._after_reduction(step)
            return
        stats = self.quantizer.quantize_(step.grads, step.global_step, names=step.names, stream=step.optimizer_idx)
        step.log("quant/rel_error", stats.rel_error)
        step.log("quant/clamped", stats.clamped_fraction)

    @override
    def on_skip(self, trainer: pl.Trainer, step: GradStep) -> None:
        # after-step mode: the guard runs first, so a skipped step was never quantized
        if self.communication is None:
            return
        self.communication.undo_step()
        self._after_reduction(step)
        if step.rewound:
            self.communication.load_state_dict(self._rewind_residuals)

    def _after_reduction(self, step: GradStep) -> None:
        """Log the hook's statistics (the bytes were sent, applied or not); when a rewinding guard took its snapshot
        at this step, keep the residuals from before the step: those that the steps the snapshot holds left."""
        stats = self.communication.stats
        step.log("comm/bytes", stats.bytes_sent)
        step.log("comm/ratio", stats.ratio)
        step.log("quant/rel_error", stats.rel_error)
        guard = next((cb for cb in self.pipeline.callbacks if isinstance(cb, ExplosionGuard) and cb.uses_rewind), None)
        if guard is not None and guard.snapshot.step == step.global_step:
            self._rewind_residuals = self.communication.state_dict(before_last_step=True)
            del self._rewind_residuals["step"]  # loaded at a rewind, the hook's step count goes on

    @override
    def charts(self) -> dict[str, list[str]]:
        charts = {"quantization": [rf"{TAG_PREFIX}/(opt\d+/)?quant/.*"]}
        if self.compress_communication:
            charts["communication"] = [rf"{TAG_PREFIX}/(opt\d+/)?comm/.*"]
        return charts

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.quantizer is not None:
            return self.quantizer.state_dict()
        if self.communication is None:  # not fitted yet: what was loaded
            return dict(self._loaded or {"ranks": []})
        own = self.communication.state_dict()
        own["residuals"] = {k: v.cpu() for k, v in own["residuals"].items()}  # sync: checkpoint time only
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"ranks": [own]}
        ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(own, ranks, dst=0)  # every rank's residuals to rank 0, whose state Lightning writes
        return {"ranks": ranks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.quantizer is not None:
            self.quantizer.load_state_dict(state_dict)
        else:  # each rank takes its own entry at fit start, once the hook is registered
            self._loaded = state_dict
