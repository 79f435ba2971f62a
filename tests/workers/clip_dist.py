"""2-process run of GradientClipping: each rank records the thresholds, coefficients and norms it used per step.

With ``agc_probe``, a plain callback after GradientClipping also runs the functional AGC clipper on the (sharded)
gradients and parameters, so one FSDP2 run covers AdaGC (the callback) and AGC (row norms of local shards).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks.clipping import GradientClipping
from lightning_gradguard.functional.clipping import GradientClipper
from tests.workers.common import ShardableRegressor, full_state, make_trainer, parse_args, write_result


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Spikes(Callback):
    """Multiplies the gradients at given steps, before gradguard sees them."""

    def __init__(self, spikes: dict[int, float]) -> None:
        self.spikes = spikes

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        factor = self.spikes.get(trainer.global_step)
        if factor is not None:
            for p in pl_module.parameters():
                p.grad.mul_(factor)


class RecordingClipping(GradientClipping):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[dict] = []

    def process_step(self, trainer, pl_module, step):
        # test-side reads, outside the callback's own work: full-tensor norms gathered from the shards
        full_norms = [full(g).norm().item() for g in step.grads]
        super().process_step(trainer, pl_module, step)
        self.seen.append(
            {
                "step": step.step,
                "threshold": step.clip_threshold.item(),
                "coef": step.clip_coef.item(),
                "clipped": step.clipped_norm.item(),
                "per_tensor": step.per_tensor.tolist(),
                "full_per_tensor": full_norms,
                "clipped_full": torch.stack([full(g).norm() for g in step.grads]).norm().item(),
            }
        )


class AgcProbe(Callback):
    """Runs the functional AGC clipper on the gradients after GradientClipping, and records what it did."""

    def __init__(self) -> None:
        self.clipper = GradientClipper("agc", agc_factor=0.05)
        self.seen: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names, params = zip(*pl_module.named_parameters())
        result = self.clipper.clip_(params, names=names)
        self.seen.append(
            {
                "threshold": result.threshold.item(),
                "clipped": result.clipped_norm.item(),
                "clipped_full": torch.stack([full(p.grad).norm() for p in params]).norm().item(),
            }
        )


def callbacks_for(config: dict) -> tuple[RecordingClipping, AgcProbe | None, list[Callback]]:
    clipping = RecordingClipping(**config.get("clipping", {}))
    probe = AgcProbe() if config.get("agc_probe") else None
    spikes = Spikes({int(k): v for k, v in config.get("spikes", {}).items()})
    return clipping, probe, [spikes, clipping] + ([probe] if probe else [])


if __name__ == "__main__":
    out, strategy, config = parse_args()
    clipping, probe, callbacks = callbacks_for(config)
    model = ShardableRegressor(batch_size=config.get("batch_size", 8))
    trainer = make_trainer(strategy, max_steps=config.get("max_steps", 8), callbacks=callbacks)
    trainer.fit(model)
    write_result(
        out,
        trainer,
        {
            "rank": trainer.global_rank,
            "seen": clipping.seen,
            "agc": probe.seen if probe else [],
            "params": full_state(model),
        },
    )
