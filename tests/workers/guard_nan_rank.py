"""2-process run of ExplosionGuard: a NaN on one rank's batch, a fault on one rank after the gradient reduction,
then a loss blow-up on the other rank.

Rank 1's loss is NaN at ``nan_step`` (response "skip"); rank 1's own gradients turn NaN after DDP averaged them at
``local_fault_step`` (rank 0's stay finite: only rank 1 sees the event); rank 0's loss is multiplied by 1000 at
``blowup_steps`` (a gradient-norm and loss spike, response "rewind" with patience 2). Each rank records what the
guard decided at every step and its full parameters around the rewind.
"""

import torch
from common import ShardableRegressor, full_state, make_trainer, parse_args, write_result
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard.callbacks.guard import ExplosionGuard
from tests.helpers.faults import Faults


class RecordingGuard(ExplosionGuard):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.decisions = []

    def process_step(self, trainer, pl_module, step):
        super().process_step(trainer, pl_module, step)
        self.decisions.append([step.step, step.skipped, self.rewinds])


class AdamRegressor(ShardableRegressor):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ParamsAt(Callback):
    """Full parameters at the start of ``start_step`` and at the end of ``end_step``."""

    def __init__(self, start_step, end_step):
        self.start_step, self.end_step = start_step, end_step
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start_step:
            self.start = full_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.end_step + 1:
            self.end = full_state(pl_module)


if __name__ == "__main__":
    out, strategy, config = parse_args()
    guard = RecordingGuard(
        on_nonfinite="skip",
        on_spike="rewind",
        window=8,
        warmup=4,
        threshold=20.0,  # the blow-ups are thousands of spreads above the baseline; early noise on 8 values is not
        snapshot_interval=config["snapshot_interval"],
        rewind_patience=2,
        flush_interval=3,
    )
    params_at = ParamsAt(config["snapshot_step"], config["blowup_steps"][-1])
    model = AdamRegressor()
    faults = [
        Faults(loss={config["nan_step"]: "nan"}, grads={config["local_fault_step"]: "nan"}, ranks={1}),
        Faults(loss_scale=dict.fromkeys(config["blowup_steps"], 1000.0), ranks={0}),
    ]
    trainer = make_trainer(
        strategy,
        max_steps=config["max_steps"],
        callbacks=[*faults, guard, params_at],
        logger=TensorBoardLogger(str(out), name="logs", version=0),
    )
    trainer.fit(model)
    write_result(
        out,
        trainer,
        {
            "rank": trainer.global_rank,
            "decisions": guard.decisions,
            "skipped": guard.skipped,
            "rewinds": guard.rewinds,
            "params": full_state(model),
            "snapshot_params": params_at.start,
            "after_rewind_params": params_at.end,
            "events_path": str(guard.events_path) if guard.events_path else None,
        },
    )
