"""Demo: a training run with GradientNormMonitor that writes TensorBoard logs and prints what happened."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import GradientNormMonitor  # noqa: E402
from tests.helpers.tb import read_scalars  # noqa: E402


class DeepRegressor(L.LightningModule):
    def __init__(self, depth: int = 12, width: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.lr = lr
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(4096, width, generator=gen)
        self.y = self.x[:, :1].sin()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=64, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log-dir", default="gradguard_logs")
    parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()
    L.seed_everything(0)
    logger = TensorBoardLogger(args.log_dir, name="demo")
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[GradientNormMonitor(layer_interval=10, histogram_interval=50)],
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    trainer.fit(DeepRegressor())
    norms = read_scalars(logger.log_dir)["gradguard/grad_norm"]
    print(f"\nlogged the gradient norm of {len(norms)} optimizer steps; largest {max(norms.values()):.3g} "
          f"at step {max(norms, key=norms.get)}")
    print(f"TensorBoard logs: {logger.log_dir}\nopen them with:  tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
