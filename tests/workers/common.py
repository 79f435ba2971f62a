"""Helpers for the scripts in ``tests/workers/`` (run by ``tests/helpers/dist.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn


def parse_args() -> tuple[Path, str, dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", required=True, choices=["ddp", "fsdp2"])
    parser.add_argument("--config", default="{}")
    args = parser.parse_args()
    return Path(args.out), args.strategy, json.loads(args.config)


def make_strategy(name: str) -> Any:
    """``"ddp"``: Lightning DDP; ``"fsdp2"``: ``ModelParallelStrategy(data_parallel_size=2)`` (the module must
    call :func:`fully_shard_module` in ``configure_model``)."""
    if name == "ddp":
        return "ddp"
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def make_trainer(strategy: str, **kwargs: Any) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=2,
        strategy=make_strategy(strategy),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def fully_shard_module(module: nn.Module, device_mesh: Any) -> None:
    """FSDP2: shard each child ``nn.Linear`` and then the root on the data-parallel mesh."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    for child in module.modules():
        if isinstance(child, nn.Linear):
            fully_shard(child, mesh=mesh)
    fully_shard(module, mesh=mesh)


def write_result(out: Path, trainer: L.Trainer, result: dict) -> None:
    """Write this rank's result, then take the process group down with both ranks present: gloo's threads left
    running at interpreter exit can abort the process after a run that succeeded."""
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def full_state(module: nn.Module) -> dict[str, list]:
    """Parameters as full (unsharded) tensors, as nested lists, for comparison across ranks and runs."""
    out = {}
    for name, p in module.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.cpu().double().flatten().tolist()
    return out


class ShardableRegressor(L.LightningModule):
    """A small MLP on a fixed synthetic regression task; shards itself under FSDP2."""

    def __init__(self, width: int = 16, depth: int = 3, lr: float = 0.05, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.x = torch.randn(256, width, generator=gen)
        self.y = torch.randn(256, 1, generator=gen)

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            fully_shard_module(self.net, mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> Any:
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # unshuffled: the global batch k of N ranks is samples [k*N*B, (k+1)*N*B), as for one process with N*B
            sampler = torch.utils.data.DistributedSampler(ds, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=self.hparams.batch_size, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
