"""Small real LightningModules for the tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn


class TinyMLP(L.LightningModule):
    """A few Linear+Tanh layers on a fixed synthetic regression task (deterministic per ``seed``)."""

    def __init__(
        self,
        width: int = 16,
        depth: int = 3,
        lr: float = 0.05,
        batch_size: int = 8,
        num_samples: int = 256,
        seed: int = 0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.x = torch.randn(num_samples, width, generator=gen)
        self.y = torch.randn(num_samples, 1, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> Any:
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def tiny_trainer(tmp_path: Any, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
