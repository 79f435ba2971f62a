"""The workloads of the clipping outcome suite: healthy runs a default must leave alone, exploding runs it must rescue.

Every workload is a small real training run (a ``LightningModule`` and a ``LightningDataModule``, trained by
``lightning.Trainer.fit`` on the CPU in a few seconds) with a fixed number of optimizer steps, a held-out set and a
divergence threshold (:func:`examples.workloads.evaluate` judges a run on them). :data:`SUITE` lists them, each with

- its **kind**: ``"healthy"`` (trains well without clipping; a default must not change its outcome) or
  ``"exploding"`` (diverges, spikes or stalls without clipping, trains with a fixed ``gradient_clip_val``), and
- its **optimizer family**: ``"sgd"`` (SGD, with or without momentum) or ``"adam"`` (Adam, AdamW).

:data:`SELECTION` and :data:`CONFIRMATION` split the suite in two: a default is chosen on the selection set and
confirmed on the confirmation set. Each set holds healthy and exploding workloads of both optimizer families.

Data is built in memory, without downloads. The language models read real text from the machine they run on:
the OS's license texts (``/usr/share/common-licenses``), the package copyright files (``/usr/share/doc/*/copyright``)
and the metadata of the installed Python packages (their ``*.dist-info/METADATA``, which holds their READMEs).
:func:`machine_text` reads them in sorted order up to a fixed number of characters, so the text is fixed for a given
machine, but it depends on which files that machine has: results from another machine are comparable only where its
text is the same. The other workloads are synthetic and identical everywhere.
"""

from __future__ import annotations

import glob
import math
import os
import re
import sysconfig
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule, seed_everything
from lightning.pytorch.demos import LightningTransformer
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from examples.workloads import WorkloadData, build_workload

__all__ = [
    "CONFIRMATION",
    "HOLDOUT",
    "SELECTION",
    "SUITE",
    "TEXT_SOURCES",
    "Workload",
    "build",
    "machine_text",
]

Kind = Literal["healthy", "exploding"]
Family = Literal["sgd", "adam"]


# ---------------------------------------------------------------------------------------------------------------
# text that ships with the machine
# ---------------------------------------------------------------------------------------------------------------


def _site_packages_metadata() -> list[str]:
    return glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "*.dist-info", "METADATA"))


TEXT_SOURCES: dict[str, Callable[[], list[str]]] = {
    "licenses": lambda: glob.glob("/usr/share/common-licenses/*"),
    "copyrights": lambda: glob.glob("/usr/share/doc/*/copyright"),
    "package_docs": _site_packages_metadata,
}
"""``name -> (function listing the files of that source)``; :func:`machine_text` sorts and deduplicates them."""


def machine_text(source: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of the files of ``source`` (a key of :data:`TEXT_SOURCES`).

    Files are read in sorted order of their paths, each once (links to a file already read are skipped), decoded as
    UTF-8 with undecodable bytes replaced. The text depends on the files installed on this machine.

    Raises:
        ValueError: for an unknown ``source``, a ``max_chars`` that is not a positive integer, or a machine whose
            files of that source hold fewer than ``max_chars`` characters.
    """
    if source not in TEXT_SOURCES:
        raise ValueError(f"Expected `source` to be one of {sorted(TEXT_SOURCES)} but got {source!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"Expected `max_chars` to be a positive integer but got {max_chars!r}")
    seen: set[str] = set()
    chunks: list[str] = []
    total = 0
    for path in sorted(TEXT_SOURCES[source]()):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            return "".join(chunks)[:max_chars]
    raise ValueError(
        f"The {source!r} text of this machine has {total} characters, fewer than `max_chars` = {max_chars}"
    )


def _char_tokens(text: str) -> Tensor:
    """Token 0 for any character outside printable ASCII and newline, 1 for newline, 2.. for ``' '`` to ``'~'``."""
    codes = torch.tensor([ord(c) for c in text], dtype=torch.long)
    tokens = torch.where((codes >= 32) & (codes < 127), codes - 30, torch.zeros_like(codes))
    return torch.where(codes == ord("\n"), torch.ones_like(codes), tokens)


CHAR_VOCAB = 97
_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def _word_tokens(text: str, vocab_size: int, train_fraction: float) -> Tensor:
    """Lower-cased words, numbers and punctuation; the ``vocab_size - 1`` most frequent in the training part get
    their own id (ties broken alphabetically), every other word id 0."""
    words = _WORD.findall(text.lower())
    counts = Counter(words[: int(len(words) * train_fraction)])
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - 1]
    ids = {w: i + 1 for i, w in enumerate(ranked)}
    return torch.tensor([ids.get(w, 0) for w in words], dtype=torch.long)


class _Windows(Dataset):
    """``(x, y)``: ``context`` tokens and the same window shifted by one, a window every ``stride`` tokens."""

    def __init__(self, tokens: Tensor, context: int, stride: int) -> None:
        self.tokens, self.context, self.stride = tokens, context, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.context - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        window = self.tokens[index * self.stride : index * self.stride + self.context + 1]
        return window[:-1], window[1:]


class MachineTextData(WorkloadData):
    """Language-model windows over :func:`machine_text`, as characters or words.

    The first 90% of the text trains (a window at every ``stride`` tokens), the rest is held out (non-overlapping
    windows, at most ``num_val``). After ``setup``, :attr:`unigram_nats` is the held-out cross entropy of the
    training text's token frequencies (add-one smoothed): a language model above it learned nothing.
    """

    unigram_nats: float

    def __init__(
        self,
        source: str,
        max_chars: int,
        context: int,
        batch_size: int,
        seed: int,
        words: Optional[int] = None,
        stride: int = 1,
        num_val: int = 128,
    ) -> None:
        super().__init__(batch_size, seed)
        self.source, self.max_chars, self.context = source, max_chars, context
        self.words, self.stride, self.num_val = words, stride, num_val

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        text = machine_text(self.source, self.max_chars)
        tokens = _char_tokens(text) if self.words is None else _word_tokens(text, self.words, 0.9)
        split = int(len(tokens) * 0.9)
        counts = torch.bincount(tokens[:split], minlength=int(tokens.max()) + 1).double() + 1.0
        self.unigram_nats = float(-(counts / counts.sum()).log()[tokens[split:]].mean())
        held_out = _Windows(tokens[split:], self.context, self.context)
        return (
            _Windows(tokens[:split], self.context, self.stride),
            Subset(held_out, range(min(len(held_out), self.num_val))),
        )


# ---------------------------------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
    """Disjoint streams of one seed: 0 trains, 1 is held out (as ``examples.workloads``)."""
    return torch.Generator().manual_seed(2 * seed + stream)


class SyntheticData(WorkloadData):
    """A dataset drawn by ``sample(n, generator, task)``; ``task`` is drawn once from the training stream (class
    centres, templates, a teacher), so the training and held-out sets share it."""

    def __init__(
        self,
        make_task: Callable[[torch.Generator], Any],
        sample: Callable[[int, torch.Generator, Any], TensorDataset],
        num_train: int,
        num_val: int,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__(batch_size, seed)
        self.make_task, self.sample = make_task, sample
        self.num_train, self.num_val = num_train, num_val

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        train_gen = _generator(self.seed, 0)
        task = self.make_task(train_gen)
        return self.sample(self.num_train, train_gen, task), self.sample(self.num_val, _generator(self.seed, 1), task)


def _blob_centres(dim: int, classes: int, separation: float) -> Callable[[torch.Generator], Tensor]:
    return lambda g: separation * torch.randn(classes, dim, generator=g)


def _blobs(n: int, g: torch.Generator, centres: Tensor) -> TensorDataset:
    labels = torch.randint(0, centres.shape[0], (n,), generator=g)
    return TensorDataset(centres[labels] + torch.randn(n, centres.shape[1], generator=g), labels)


def _templates(g: torch.Generator) -> Tensor:
    """Ten smooth random 12x12 patterns (noise blurred by a 5x5 box filter, scaled to unit variance)."""
    noise = torch.randn(10, 1, 16, 16, generator=g)
    smooth = F.avg_pool2d(noise, 5, stride=1)
    return smooth / smooth.std(dim=(1, 2, 3), keepdim=True)


def _shifted_templates(n: int, g: torch.Generator, templates: Tensor) -> TensorDataset:
    """A template, shifted cyclically by up to 2 pixels each way, plus unit Gaussian noise."""
    labels = torch.randint(0, templates.shape[0], (n,), generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.stack(
        [torch.roll(templates[y], (int(dy), int(dx)), dims=(1, 2)) for y, (dy, dx) in zip(labels, shifts)]
    )
    return TensorDataset(images + torch.randn(images.shape, generator=g), labels)


def _teacher(dim: int, scale: float) -> Callable[[torch.Generator], tuple[Tensor, Tensor, float]]:
    def make(g: torch.Generator) -> tuple[Tensor, Tensor, float]:
        return torch.randn(dim, 32, generator=g) / math.sqrt(dim), torch.randn(32, generator=g) / math.sqrt(32), scale

    return make


def _teacher_regression(n: int, g: torch.Generator, teacher: tuple[Tensor, Tensor, float]) -> TensorDataset:
    """``y = scale * (tanh(x W1) w2 + 0.1 noise)``: targets of standard deviation about ``scale / 2``."""
    w1, w2, scale = teacher
    x = torch.randn(n, w1.shape[0], generator=g)
    return TensorDataset(x, scale * (torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(n, generator=g)))


def _leverage_task(dim: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(dim, generator=g)


def _leverage_regression(rate: float, scale: float) -> Callable[[int, torch.Generator, Tensor], TensorDataset]:
    """``y = x w + 0.5 noise``, where a ``rate`` share of the inputs is ``scale`` times larger (rare, high-leverage
    samples). The held-out set (drawn with the same rule) measures the error on both."""

    def sample(n: int, g: torch.Generator, w: Tensor) -> TensorDataset:
        x = torch.randn(n, w.shape[0], generator=g)
        x = x * torch.where(torch.rand(n, 1, generator=g) < rate, scale, 1.0)
        return TensorDataset(x, x @ w + 0.5 * torch.randn(n, generator=g))

    return sample


def _shift_tokens(n: int, g: torch.Generator, task: tuple[int, int, int]) -> TensorDataset:
    """Random tokens and their successor under ``next = (current + shift) mod vocab``."""
    vocab, length, shift = task
    x = torch.randint(0, vocab, (n, length), generator=g)
    return TensorDataset(x, (x + shift) % vocab)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optim:
    """An optimizer and its learning-rate schedule: a linear warm-up over ``warmup`` steps, then constant, or a
    cosine decay to 10% over ``decay`` steps."""

    name: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup: int = 0
    decay: Optional[int] = None

    def build(self, params: Any) -> Any:
        if self.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        elif self.name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if not self.warmup and self.decay is None:
            return optimizer

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            if self.decay is None:
                return 1.0
            progress = min(1.0, (step - self.warmup) / max(1, self.decay - self.warmup))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SuiteModule(LightningModule):
    """A model with one loss (:meth:`compute_loss`), an :class:`Optim`, a divergence threshold, and optionally bad
    batches: at the optimizer steps in ``bad_steps`` the inputs are multiplied by ``bad_scale`` (a glitching
    sensor, a mis-normalised shard), which makes the loss and the gradient spike for that step."""

    def __init__(
        self,
        net: nn.Module,
        loss: Callable[[Tensor, Tensor], Tensor],
        optim: Optim,
        divergence_threshold: float,
        bad_steps: tuple[int, ...] = (),
        bad_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.net, self.loss, self.optim = net, loss, optim
        self.divergence_threshold = divergence_threshold
        self.bad_steps, self.bad_scale = frozenset(bad_steps), bad_scale

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return self.loss(self.net(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.global_step in self.bad_steps:
            x = x * self.bad_scale
        return self.compute_loss((x, y))

    def configure_optimizers(self) -> Any:
        return self.optim.build(self.parameters())


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mse(prediction: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(prediction.squeeze(-1), y)


class RecurrentLM(nn.Module):
    """Embedding, one recurrent layer (``nn.LSTM``, ``nn.GRU`` or the tanh ``nn.RNN``), a linear read-out of every
    state."""

    def __init__(self, vocab: int, embed: int, hidden: int, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = cell(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class TransformerLM(nn.Module):
    """A causal transformer language model with learned positions and no dropout, pre- or post-LayerNorm."""

    def __init__(self, vocab: int, context: int, width: int, heads: int, layers: int, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width) if norm_first else nn.Identity()
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.encoder(self.embed(tokens) + self.position[:n], mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class ShiftPatternTransformer(LightningTransformer):
    """Lightning's own demo transformer (``lightning.pytorch.demos.LightningTransformer``, with its own SGD at
    lr 0.1), on a token pattern it can learn: ``next = (current + 7) mod 64``."""

    def __init__(self) -> None:
        super().__init__(vocab_size=64)
        self.divergence_threshold = math.log(64)

    def prepare_data(self) -> None:
        """The demo downloads WikiText-2 here; the suite's data is built in memory."""

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.reshape(-1))


# ---------------------------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One workload of the suite: how to build it for a seed, how long to train, and what it stands for."""

    name: str
    kind: Kind
    family: Family
    steps: int
    make: Callable[[int], tuple[LightningModule, LightningDataModule]]
    description: str


Built = tuple[LightningModule, LightningDataModule]


def _language_model(net: nn.Module, optim: Optim, data: MachineTextData) -> Built:
    """Judged against the text's unigram cross entropy."""
    data.setup()
    return SuiteModule(net, _lm_loss, optim, data.unigram_nats), data


def _regression(net: nn.Module, optim: Optim, data: SyntheticData) -> Built:
    """Judged against the held-out variance of the targets (the error of predicting their mean)."""
    data.setup()
    targets = torch.stack([y for _, y in data._val])
    return SuiteModule(net, _mse, optim, float(targets.var())), data


def _classifier(net: nn.Module, optim: Optim, data: SyntheticData, **bad_batches: Any) -> Built:
    """Judged against chance, ``log(10)``."""
    return SuiteModule(net, F.cross_entropy, optim, math.log(10), **bad_batches), data


def _blobs_data(seed: int, separation: float = 1.0) -> SyntheticData:
    return SyntheticData(_blob_centres(32, 10, separation), _blobs, 8192, 2048, 128, seed)


def _templates_data(seed: int) -> SyntheticData:
    return SyntheticData(_templates, _shifted_templates, 4096, 1024, 64, seed)


def _copyright_words(seed: int) -> MachineTextData:
    return MachineTextData("copyrights", 600_000, 24, 16, seed, words=1000, stride=8)


def _chars(source: str, max_chars: int, seed: int) -> MachineTextData:
    return MachineTextData(source, max_chars, 32, 16, seed, stride=4)


# four inputs x1000 in a row mid-run: the spike a glitching sensor or a mis-scaled shard makes
_BAD_BATCHES = {"bad_steps": (80, 81, 82, 83), "bad_scale": 1000.0}


def _mlp_blobs(seed: int) -> Built:
    return _classifier(_mlp([32, 64, 64, 10]), Optim("sgd", 0.1), _blobs_data(seed))


def _demo_transformer(seed: int) -> Built:
    return ShiftPatternTransformer(), SyntheticData(lambda g: (64, 8, 7), _shift_tokens, 4096, 256, 8, seed)


def _conv_templates(seed: int) -> Built:
    return _classifier(_cnn(), Optim("sgd", 0.05, momentum=0.9), _templates_data(seed))


def _lstm_words(seed: int) -> Built:
    net = RecurrentLM(1000, 64, 64)
    return _language_model(net, Optim("sgd", 0.5, momentum=0.9, decay=200), _copyright_words(seed))


def _lstm_chars(seed: int) -> Built:
    data = MachineTextData("licenses", 200_000, 32, 16, seed, stride=4)
    return _language_model(RecurrentLM(CHAR_VOCAB, 32, 64), Optim("adam", 3e-3), data)


def _adamw_warmup_transformer(seed: int) -> Built:
    net = TransformerLM(CHAR_VOCAB, 32, 48, 4, 2, norm_first=True)
    optim = Optim("adamw", 3e-3, weight_decay=0.01, warmup=40, decay=250)
    return _language_model(net, optim, _chars("package_docs", 300_000, seed))


def _adam_regression(seed: int) -> Built:
    data = SyntheticData(_teacher(16, 20.0), _teacher_regression, 8192, 2048, 64, seed)
    return _regression(_mlp([16, 64, 64, 1]), Optim("adam", 3e-3), data)


# target noise of 0.1: an error floor of 0.01, so that a relative tolerance on the held-out error means something
_ADDING = {"seq_len": 100, "num_train": 4096, "num_val": 512, "noise_std": 0.1}


def _irnn_adding(seed: int) -> Built:
    return build_workload("rnn", seed=seed, **_ADDING)


def _deep_mlp(seed: int) -> Built:
    return build_workload("mlp", seed=seed, width=64, num_train=8192, num_val=1024)


def _sgd_char_transformer(seed: int) -> Built:
    return build_workload("transformer", seed=seed, max_chars=200_000, d_model=32, context=32, num_val=128)


def _lstm_words_sgd20(seed: int) -> Built:
    return _language_model(RecurrentLM(1000, 64, 64), Optim("sgd", 20.0), _copyright_words(seed))


def _leverage_sgd(seed: int) -> Built:
    data = SyntheticData(_leverage_task(32), _leverage_regression(0.01, 10.0), 8192, 2048, 32, seed)
    return _regression(nn.Linear(32, 1), Optim("sgd", 0.02, momentum=0.9), data)


def _postln_adamw(seed: int) -> Built:
    net = TransformerLM(CHAR_VOCAB, 32, 48, 4, 2, norm_first=False)
    return _language_model(net, Optim("adamw", 3e-2, weight_decay=0.01), _chars("licenses", 200_000, seed))


def _adamw_bad_batches(seed: int) -> Built:
    optim = Optim("adamw", 1e-3, weight_decay=0.01)
    return _classifier(_mlp([32, 128, 128, 10]), optim, _blobs_data(seed, separation=0.5), **_BAD_BATCHES)


def _adamw_conv_bad_batches(seed: int) -> Built:
    optim = Optim("adamw", 2e-3, weight_decay=0.01)
    return _classifier(_cnn(), optim, _templates_data(seed), **_BAD_BATCHES)


def _adam_irnn(seed: int) -> Built:
    return build_workload("rnn", seed=seed, optimizer="adam", lr=3e-3, **_ADDING)


def _linear_teacher(dim: int, scale: float) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(dim, generator=g) * scale


def _linear_regression(n: int, g: torch.Generator, w: Tensor) -> TensorDataset:
    """``y = x w + 0.5 noise``: with ``w`` of entries ``~ N(0, 3^2)`` in 32 dimensions the targets are ~17."""
    x = torch.randn(n, w.shape[0], generator=g)
    return TensorDataset(x, x @ w + 0.5 * torch.randn(n, generator=g))


def _linear_data(seed: int) -> SyntheticData:
    return SyntheticData(_linear_teacher(32, 3.0), _linear_regression, 8192, 2048, 32, seed)


def _linear_sgd(seed: int) -> Built:
    return _regression(nn.Linear(32, 1), Optim("sgd", 0.01), _linear_data(seed))


# the holdout set: added after the first default was chosen, and fixed before any candidate ran on it


def _gru_chars_sgd(seed: int) -> Built:
    data = MachineTextData("copyrights", 200_000, 32, 16, seed, stride=4)
    return _language_model(RecurrentLM(CHAR_VOCAB, 32, 64, nn.GRU), Optim("sgd", 0.3, momentum=0.9), data)


def _mlp_regression_sgd(seed: int) -> Built:
    data = SyntheticData(_teacher(8, 5.0), _teacher_regression, 8192, 2048, 64, seed)
    return _regression(_mlp([8, 128, 1]), Optim("sgd", 0.01), data)


def _gru_words_adam(seed: int) -> Built:
    return _language_model(RecurrentLM(1000, 64, 64, nn.GRU), Optim("adam", 2e-3), _copyright_words(seed))


def _linear_adam(seed: int) -> Built:
    return _regression(nn.Linear(32, 1), Optim("adam", 0.05), _linear_data(seed))


def _rnn_chars_sgd(seed: int) -> Built:
    data = MachineTextData("package_docs", 200_000, 32, 16, seed, stride=4)
    return _language_model(RecurrentLM(CHAR_VOCAB, 32, 128, nn.RNN), Optim("sgd", 4.0), data)


def _mlp_blobs_sgd_lr1(seed: int) -> Built:
    return _classifier(_mlp([32, 128, 128, 128, 10]), Optim("sgd", 1.0, momentum=0.9), _blobs_data(seed))


def _adam_regression_bad_batches(seed: int) -> Built:
    data = SyntheticData(_teacher(16, 20.0), _teacher_regression, 8192, 2048, 64, seed)
    module, data = _regression(_mlp([16, 64, 64, 1]), Optim("adam", 3e-3), data)
    module.bad_steps, module.bad_scale = frozenset(_BAD_BATCHES["bad_steps"]), _BAD_BATCHES["bad_scale"]
    return module, data


def _adamw_deep_mlp(seed: int) -> Built:
    return _classifier(_mlp([32] + [64] * 12 + [10]), Optim("adamw", 1e-2), _blobs_data(seed, separation=0.5))


_WORKLOADS = [
    Workload("mlp_blobs", "healthy", "sgd", 200, _mlp_blobs, "3-layer MLP, Gaussian clusters, SGD lr 0.1"),
    Workload(
        "demo_transformer",
        "healthy",
        "sgd",
        120,
        _demo_transformer,
        "Lightning's demo LightningTransformer, its own SGD lr 0.1, next = (current + 7) mod 64",
    ),
    Workload("conv_templates", "healthy", "sgd", 200, _conv_templates, "small CNN, shifted templates, SGD+momentum"),
    Workload("lstm_words", "healthy", "sgd", 200, _lstm_words, "LSTM word LM (copyright files), SGD+momentum, cosine"),
    Workload("lstm_chars", "healthy", "adam", 200, _lstm_chars, "LSTM character LM (license texts), Adam"),
    Workload(
        "adamw_warmup_transformer",
        "healthy",
        "adam",
        250,
        _adamw_warmup_transformer,
        "pre-LN transformer character LM (package docs), AdamW, warm-up then cosine",
    ),
    Workload("adam_regression", "healthy", "adam", 300, _adam_regression, "MLP regression, targets ~10, Adam"),
    Workload("irnn_adding", "exploding", "sgd", 300, _irnn_adding, "IRNN on the adding problem, SGD+momentum lr 0.01"),
    Workload("deep_mlp", "exploding", "sgd", 300, _deep_mlp, "32-layer unnormalised MLP, SGD+momentum"),
    Workload(
        "sgd_char_transformer",
        "exploding",
        "sgd",
        150,
        _sgd_char_transformer,
        "post-LN character transformer (stdlib sources), SGD+momentum lr 1, no warm-up",
    ),
    Workload("lstm_words_sgd20", "exploding", "sgd", 200, _lstm_words_sgd20, "LSTM word LM, plain SGD lr 20"),
    Workload(
        "leverage_sgd", "exploding", "sgd", 300, _leverage_sgd, "linear regression, 1% of inputs 10x, SGD+momentum"
    ),
    Workload(
        "postln_adamw",
        "exploding",
        "adam",
        200,
        _postln_adamw,
        "post-LN transformer character LM (license texts), AdamW lr 3e-2, no warm-up",
    ),
    Workload(
        "adamw_bad_batches",
        "exploding",
        "adam",
        200,
        _adamw_bad_batches,
        "MLP on Gaussian clusters, AdamW; four batches with inputs x1000 mid-run",
    ),
    Workload(
        "adamw_conv_bad_batches",
        "exploding",
        "adam",
        200,
        _adamw_conv_bad_batches,
        "small CNN on shifted templates, AdamW; four batches with inputs x1000 mid-run",
    ),
    Workload("adam_irnn", "exploding", "adam", 300, _adam_irnn, "IRNN on the adding problem, Adam lr 3e-3"),
    Workload("linear_sgd", "healthy", "sgd", 300, _linear_sgd, "linear regression, targets ~17, SGD lr 0.01"),
    Workload("gru_chars_sgd", "healthy", "sgd", 200, _gru_chars_sgd, "GRU char LM (copyright files), SGD+momentum"),
    Workload("mlp_regression_sgd", "healthy", "sgd", 300, _mlp_regression_sgd, "one-hidden-layer MLP regression, SGD"),
    Workload("gru_words_adam", "healthy", "adam", 200, _gru_words_adam, "GRU word LM (copyright files), Adam"),
    Workload("linear_adam", "healthy", "adam", 300, _linear_adam, "linear regression, targets ~17, Adam lr 0.05"),
    Workload("rnn_chars_sgd", "exploding", "sgd", 200, _rnn_chars_sgd, "tanh RNN char LM (package docs), SGD lr 4"),
    Workload("mlp_blobs_sgd_lr1", "exploding", "sgd", 200, _mlp_blobs_sgd_lr1, "4-layer MLP, SGD+momentum lr 1"),
    Workload(
        "adam_regression_bad_batches",
        "exploding",
        "adam",
        300,
        _adam_regression_bad_batches,
        "MLP regression, targets ~10, Adam; four batches with inputs x1000 mid-run",
    ),
    Workload("adamw_deep_mlp", "exploding", "adam", 200, _adamw_deep_mlp, "13-layer unnormalised MLP, AdamW lr 1e-2"),
]

SUITE: dict[str, Workload] = {w.name: w for w in _WORKLOADS}
"""Every workload of the suite, by name."""

# The split alternates through the list above (selection, confirmation, selection, ...), which is ordered by kind,
# then optimizer family. It was fixed before any candidate rule was run; changing it voids the confirmation.
SELECTION: tuple[str, ...] = (
    "mlp_blobs",
    "conv_templates",
    "lstm_chars",
    "adam_regression",
    "deep_mlp",
    "lstm_words_sgd20",
    "postln_adamw",
    "adamw_conv_bad_batches",
    "linear_sgd",
)
"""The workloads a default is chosen on: healthy and exploding, SGD and Adam. ``linear_sgd`` joined after the first
default (``ema_ratio_4+sgd_explosion_cap_1``) was found to stall it."""

CONFIRMATION: tuple[str, ...] = (
    "demo_transformer",
    "lstm_words",
    "adamw_warmup_transformer",
    "irnn_adding",
    "sgd_char_transformer",
    "leverage_sgd",
    "adamw_bad_batches",
    "adam_irnn",
)
"""The workloads a chosen default is confirmed on, never used to choose it."""

HOLDOUT: tuple[str, ...] = (
    "gru_chars_sgd",
    "mlp_regression_sgd",
    "gru_words_adam",
    "linear_adam",
    "rnn_chars_sgd",
    "mlp_blobs_sgd_lr1",
    "adam_regression_bad_batches",
    "adamw_deep_mlp",
)
"""A second confirmation set, built after the confirmation set's results were known and fixed (its kinds checked
with no clipping and fixed thresholds only) before any candidate rule ran on it."""


def build(name: str, seed: int) -> tuple[LightningModule, LightningDataModule]:
    """The ``(module, datamodule)`` of workload ``name`` for ``seed``: the global RNGs are seeded first, so the
    initial weights are fixed by the seed, and the data is drawn from streams of the same seed."""
    if name not in SUITE:
        raise ValueError(f"Expected `name` to be one of {sorted(SUITE)} but got {name!r}")
    seed_everything(seed, verbose=False)
    return SUITE[name].make(seed)
