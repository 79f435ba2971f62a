"""2-process training with GradientQuantization (config: ``quantization`` kwargs, ``max_steps``, ``resume``).

Each rank reports its parameters (full tensors), residuals (local), host syncs per step and, under FSDP2:

- ``reproduced``: the first step's quantized local shard equals a standalone ``GradientQuantizer`` applied to the
  recorded local shard (it depends on nothing but the shard, the seed, the step and the shard coordinate);
- ``draws``: one sharded and one replicated ``DTensor`` with the same local values on both ranks, quantized:
  shards must draw independently, replicas identically;
- ``resumed_params``: a run resumed from the step-2 distributed checkpoint (``resume``), to compare bitwise with
  the uninterrupted run.
"""

from pathlib import Path

import torch
from common import ShardableRegressor, full_state, make_trainer, parse_args, write_result
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from quant_common import RecordingQuantization
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_gradguard.functional.quantization import GradientQuantizer

# one batch per rank per epoch: every step sees the same data, whatever Lightning does with the dataloader when
# it resumes, so the comparison isolates the restored state (parameters, optimizer, callback)
BATCH_SIZE = 128
CHECKPOINT_STEP = 2


def fit(strategy, quantization, max_steps, out, ckpt_path=None, logger=False):
    callback = RecordingQuantization(record_steps=1, flush_interval=2, **quantization)
    checkpoint = ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1)
    trainer = make_trainer(
        strategy,
        max_steps=max_steps,
        callbacks=[callback, checkpoint],
        enable_checkpointing=True,
        logger=logger,
    )
    model = ShardableRegressor(batch_size=BATCH_SIZE)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, callback


def reproduced(record, quantization) -> bool:
    tensors = [
        DTensor.from_local(b.clone(), g.device_mesh, g.placements, shape=g.shape, stride=g.stride())
        for b, g in zip(record["before"], record["grads"])
    ]
    GradientQuantizer(**quantization).quantize_(tensors, record["step"], names=record["names"])
    return all(torch.equal(t.to_local(), a) for t, a in zip(tensors, record["after"]))


def shard_draws(trainer) -> dict:
    mesh = trainer.strategy.device_mesh["data_parallel"]
    local = torch.linspace(-1.0, 1.0, 256)
    sharded = DTensor.from_local(local.clone(), mesh, [Shard(0)])
    replicated = DTensor.from_local(local.clone(), mesh, [Replicate()])
    GradientQuantizer("stochastic", bits=2, block_size=64).quantize_([sharded, replicated], step=0, names=["s", "r"])
    return {"sharded": sharded.to_local().tolist(), "replicated": replicated.to_local().tolist()}


if __name__ == "__main__":
    out, strategy, config = parse_args()
    quantization = config["quantization"]
    max_steps = config.get("max_steps", 4)
    logger = TensorBoardLogger(str(out), name="logs", version=0)
    trainer, model, callback = fit(strategy, quantization, max_steps, out, logger=logger)
    result = {
        "rank": trainer.global_rank,
        "params": full_state(model),
        "syncs": callback.syncs,
        "residuals": {n: t.double().flatten().tolist() for n, t in callback.quantizer.residuals().items()},
    }
    if strategy == "fsdp2":
        result["reproduced"] = reproduced(callback.records[0], quantization)
        result["draws"] = shard_draws(trainer)
    if config.get("resume"):
        (ckpt,) = (Path(out) / "ckpt").glob(f"*step={CHECKPOINT_STEP}.ckpt")
        _, resumed, resumed_callback = fit(strategy, quantization, max_steps, out / "resumed", ckpt_path=str(ckpt))
        result["resumed_params"] = full_state(resumed)
        result["resumed_syncs"] = resumed_callback.syncs
    write_result(out, trainer, result)
