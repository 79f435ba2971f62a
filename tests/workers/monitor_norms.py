"""2-process run of GradientNormMonitor: each rank records the global and per-tensor norms it saw per step."""

from common import ShardableRegressor, full_state, make_trainer, parse_args, write_result
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard import GradientNormMonitor


class RecordingMonitor(GradientNormMonitor):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def process_step(self, trainer, pl_module, step):
        super().process_step(trainer, pl_module, step)
        # test-side read-back, outside the callback's own work
        self.seen.append(
            {
                "step": step.step,
                "total": float(step.total),
                "per_tensor": dict(zip(step.names, step.per_tensor.tolist())),
            }
        )


if __name__ == "__main__":
    out, strategy, config = parse_args()
    monitor = RecordingMonitor(layer_interval=1, flush_interval=2)
    model = ShardableRegressor(batch_size=config.get("batch_size", 8))
    trainer = make_trainer(
        strategy,
        max_steps=config.get("max_steps", 5),
        callbacks=[monitor],
        logger=TensorBoardLogger(str(out), name="logs", version=0),
    )
    trainer.fit(model)
    write_result(out, trainer, {"rank": trainer.global_rank, "seen": monitor.seen, "params": full_state(model)})
