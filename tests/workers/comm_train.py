"""2-process DDP training with ``GradientQuantization(compress_communication=True)`` and an ExplosionGuard.

Config: ``quantization`` (the callback's arguments), ``max_steps``, ``nan_step``, ``spike_steps``,
``checkpoint_step``. One batch per rank per epoch, so that a resumed run sees the data the uninterrupted one saw.
Rank 1's own gradient is NaN before the reduction at ``nan_step`` (its loss stays finite: only the hook can tell
which rank it came from); every rank's loss is scaled by 1000 at the two ``spike_steps`` (``max_norm`` crossings:
the first is skipped, the second rewinds to the last snapshot, taken at every healthy step); a checkpoint is
written at ``checkpoint_step``. Then the run is resumed from that checkpoint as saved, and from two edited copies: one
as if written by 4 processes, one with another bucket layout.

Each rank reports, per step: its parameters, its residuals at the start of the step, those the hook started from
and those it left (read before the optimizer step), the bytes it counted, the guard's totals; and what the resumed
runs saw.
"""

import warnings
from pathlib import Path

import torch
from common import ShardableRegressor, full_state, make_trainer, parse_args, write_result
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard.callbacks.guard import ExplosionGuard
from lightning_gradguard.callbacks.quantization import GradientQuantization
from tests.helpers.faults import Faults


def flat_residuals(state_dict) -> list:
    residuals = state_dict["residuals"]
    return torch.cat([residuals[k].reshape(-1).cpu() for k in sorted(residuals)]).tolist() if residuals else []


class Recorder(Callback):
    """Listed before the gradguard callbacks: its ``on_before_optimizer_step`` runs before their pipeline."""

    def __init__(self, quantization, guard):
        self.quantization, self.guard = quantization, guard
        self.start, self.before, self.after_hook, self.params, self.decisions, self.bytes = {}, {}, {}, {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start[trainer.global_step] = flat_residuals(self.quantization.communication.state_dict())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        state = self.quantization.communication
        self.after_hook[trainer.global_step] = flat_residuals(state.state_dict())
        self.before[trainer.global_step] = flat_residuals(state.state_dict(before_last_step=True))
        self.bytes[trainer.global_step] = [state.stats.bytes_sent, state.stats.ratio]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.params[step] = full_state(pl_module)
        self.decisions[step] = [self.guard.skipped, self.guard.rewinds]


def fit(config, out, ckpt_path=None, logger=False, checkpoint=False):
    quantization = GradientQuantization(**config["quantization"], flush_interval=2)
    guard = ExplosionGuard(on_nonfinite="skip", on_spike="rewind", max_norm=100.0, snapshot_interval=1,
                           rewind_patience=2, flush_interval=2)
    recorder = Recorder(quantization, guard)
    faults = [
        Faults(unreduced={config["nan_step"]: "nan"}, ranks={1}),
        Faults(loss_scale=dict.fromkeys(config["spike_steps"], 1000.0)),
    ]
    callbacks = [*faults, recorder, quantization, guard]
    if checkpoint:
        every = config["checkpoint_step"]
        callbacks.append(ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer("ddp", max_steps=config["max_steps"], callbacks=callbacks, logger=logger,
                           enable_checkpointing=checkpoint)
    model = ShardableRegressor(batch_size=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    messages = [str(w.message) for w in caught if "restarts from zero" in str(w.message)]
    return trainer, quantization, recorder, messages


def edited(saved: dict, key: str, path: Path, edit) -> str:
    checkpoint = dict(saved)
    checkpoint["callbacks"] = dict(saved["callbacks"])
    checkpoint["callbacks"][key] = {"ranks": [edit(dict(entry)) for entry in saved["callbacks"][key]["ranks"]]}
    torch.save(checkpoint, path)
    return str(path)


def resumed(config, out, ckpt_path) -> dict:
    _, _, recorder, messages = fit(config, out, ckpt_path=ckpt_path)
    step = config["checkpoint_step"]
    return {"before": recorder.before[step], "params": recorder.params[config["max_steps"] - 1], "warnings": messages}


if __name__ == "__main__":
    out, _, config = parse_args()
    logger = TensorBoardLogger(str(out), name="logs", version=0)
    trainer, quantization, recorder, _ = fit(config, out, logger=logger, checkpoint=True)
    (ckpt,) = (out / "ckpt").glob(f"*step={config['checkpoint_step']}.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    key = quantization.state_key
    result = {
        "rank": trainer.global_rank,
        "numel": sum(p.numel() for p in trainer.lightning_module.parameters()),
        "start": recorder.start,
        "before": recorder.before,
        "after_hook": recorder.after_hook,
        "params": recorder.params,
        "decisions": recorder.decisions,
        "bytes": recorder.bytes,
        "events_path": str(Path(logger.log_dir) / "gradguard_events.jsonl"),
        "saved": [flat_residuals(entry) for entry in saved["callbacks"][key]["ranks"]],
        "saved_world_size": [entry["world_size"] for entry in saved["callbacks"][key]["ranks"]],
        "resumed": resumed(config, out / "resumed", str(ckpt)),
    }
    four = edited(saved, key, out / "four.ckpt", lambda e: {**e, "world_size": 4})
    layout = edited(saved, key, out / "layout.ckpt", lambda e: {**e, "layout": {0: [(3, 5)]}})
    result["four"] = resumed(config, out / "four", four)
    result["layout"] = resumed(config, out / "layout", layout)
    write_result(out, trainer, result)
