"""Does training still work with quantized gradients? Held-out loss of each method against the unquantized run.

The task: a student MLP (32 -> 128 -> 128 -> 10, ReLU) learns a random teacher network's labels on Gaussian
inputs, trained with Adam in ``Trainer.fit`` on the CPU; every run sees the same data in the same order
and starts from the same weights, and is judged by cross-entropy and accuracy on a fixed held-out set. The claim
checked (in ``tests/test_quantization.py`` at a smaller size, here in full): 8-bit stochastic rounding and
sign + error feedback end within ``TOLERANCE`` of the unquantized run's held-out loss.

Usage::

    python benchmarks/quant_outcomes.py                 # 600 steps x 3 seeds, prints a markdown table
    python benchmarks/quant_outcomes.py --steps 150 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard.callbacks.quantization import GradientQuantization  # noqa: E402

# held-out loss of a quantized run may exceed the unquantized run's by at most this much (absolute, in nats)
TOLERANCE = 0.05

CONFIGS: dict[str, Optional[dict[str, Any]]] = {
    "none (baseline)": None,
    "stochastic 8-bit": dict(method="stochastic", bits=8),
    "sign + EF": dict(method="sign"),
    "stochastic 4-bit": dict(method="stochastic", bits=4),
    "stochastic 2-bit": dict(method="stochastic", bits=2),
    "stochastic 2-bit + EF": dict(method="stochastic", bits=2, error_feedback=True),
    "qsgd (s=127)": dict(method="qsgd"),
    "terngrad": dict(method="terngrad"),
}


class TeacherStudent(L.LightningModule):
    def __init__(self, seed: int = 0, num_train: int = 65536, num_val: int = 2048, lr: float = 1e-3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        teacher = [torch.randn(32, 64, generator=gen), torch.randn(64, 10, generator=gen)]
        x = torch.randn(num_train + num_val, 32, generator=gen)
        y = (torch.tanh(x @ teacher[0] / 32**0.5) @ teacher[1]).argmax(1)
        self.train_set = torch.utils.data.TensorDataset(x[:num_train], y[:num_train])
        self.val_x, self.val_y = x[num_train:], y[num_train:]
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        self.lr = lr
        self.seed = seed

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> Any:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(self.train_set, batch_size=64, shuffle=True, generator=gen)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def held_out(self) -> tuple[float, float]:
        logits = self.net(self.val_x)
        loss = nn.functional.cross_entropy(logits, self.val_y).item()
        accuracy = (logits.argmax(1) == self.val_y).float().mean().item()
        return loss, accuracy


def quiet_trainer(steps: int, callbacks: list, root: str, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer (one device unless ``kwargs`` say otherwise) for ``steps`` steps; no logs, no checkpoints."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return L.Trainer(max_steps=steps, callbacks=callbacks, default_root_dir=root, **{**defaults, **kwargs})


def train(config: Optional[dict[str, Any]], steps: int, seed: int, root: str) -> tuple[float, float]:
    """Held-out (cross-entropy, accuracy) after ``steps`` optimizer steps with ``GradientQuantization(**config)``."""
    model = TeacherStudent(seed=seed)
    quiet_trainer(steps, [GradientQuantization(**config)] if config is not None else [], root).fit(model)
    return model.held_out()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    # one thread: several intra-op threads on a tiny model only contend (10x slower on a shared 2-core machine)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for name, config in CONFIGS.items():
            results[name] = [train(config, args.steps, seed, root) for seed in seeds]
    base = statistics.mean(loss for loss, _ in results["none (baseline)"])
    print(f"\n{args.steps} steps, seeds {seeds}, torch {torch.__version__}\n")
    print("| method | held-out loss (mean over seeds) | vs baseline | held-out accuracy | within tolerance |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        loss = statistics.mean(r[0] for r in runs)
        accuracy = statistics.mean(r[1] for r in runs)
        worst = max(r[0] - b[0] for r, b in zip(runs, results["none (baseline)"]))
        within = "yes" if worst <= TOLERANCE else "no"
        print(f"| {name} | {loss:.4f} | {loss - base:+.4f} | {accuracy:.3f} | {within} |")


if __name__ == "__main__":
    main()
