"""Three small training workloads whose gradients explode without a guard.

Each workload is a :class:`WorkloadModule` (a ``LightningModule``) plus a :class:`WorkloadData` (a
``LightningDataModule``). Both take only plain typed arguments with defaults, so they can be named in LightningCLI
YAML configs. At the shipped defaults, training *without* gradient clipping blows up (the loss turns ``NaN``
within a few dozen optimizer steps) while training with a fixed gradient-norm clip (``Trainer(gradient_clip_val=
...)``) learns, on CPU, in seconds.

``rnn`` -- :class:`LongRangeRNN` on :class:`AddingProblemData`
    A vanilla ReLU RNN with identity recurrent initialisation (the IRNN of Le et al., 2015) on a variant of the
    adding problem (Hochreiter & Schmidhuber, 1997): a sequence of ``(value, marker)`` pairs, one marked position in
    each half, and the target is the sum of the two marked values, read from the last state only. The gradient of
    the loss reaches the first marked value through three quarters of the sequence on average, multiplied by
    ``W_hh^T`` once per step. Each SGD step at the shipped learning rate moves ``W_hh`` off the identity; once its
    spectral radius ``rho`` exceeds one, states and gradients grow like ``rho ** seq_len``, the next update is larger
    still, and the weights run to ``inf``/``NaN``. Clipping the norm to 0.1 bounds every update and the network
    learns. The trivial predictor (always 1) has MSE ``1/6``.

``transformer`` -- :class:`CharTransformerLM` on :class:`StdlibTextData`
    A small post-LayerNorm character-level transformer language model trained on real text that ships with every
    Python installation: the sources of the standard library (top-level ``*.py`` files next to ``os.py``, sorted by
    name, read until ``max_chars`` characters). It is trained by SGD with momentum at a learning rate of 1 and no
    warm-up: the first gradients have norms of a few units, so the first updates move the weights by more than their
    own scale, the attention and output logits blow up and the loss turns ``NaN``. Clipping the norm to 0.1 bounds
    every update and the model learns well past character frequencies. The text differs between Python versions
    (and ``_sysconfigdata*.py`` between platforms); it is fixed for a given interpreter.

``mlp`` -- :class:`DeepMLP` on :class:`GaussianBlobsData`
    A deep stack of ``Linear + ReLU`` layers with no normalisation, initialised with a gain above He's ``sqrt(2)``,
    so activations and gradients grow geometrically with depth (the first gradient norm is in the hundreds),
    trained by SGD with momentum at a high learning rate on well-separated Gaussian clusters. Without clipping the
    first updates throw the weights to ``inf`` and the loss to ``NaN``; with the norm clipped to 1 the network
    trains.

:func:`build_workload` builds a module and a datamodule from the :data:`WORKLOADS` registry at ``"test"`` size
(about 150 optimizer steps in seconds) or ``"full"`` size (about 500 steps in about a minute), and
:func:`evaluate` judges the outcome of a run on the datamodule's fixed held-out set.
"""

from __future__ import annotations

import inspect
import math
import os
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchmetrics import MeanMetric

__all__ = [
    "VOCAB_SIZE",
    "WORKLOADS",
    "AddingProblemData",
    "CharTransformerLM",
    "DeepMLP",
    "GaussianBlobsData",
    "LongRangeRNN",
    "StdlibTextData",
    "WorkloadData",
    "WorkloadModule",
    "build_workload",
    "evaluate",
    "stdlib_text",
]

_OPTIMIZERS = ("sgd", "adam")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive integer but got {value!r}")


def _check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative integer but got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite number but got {value!r}")


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one of two disjoint streams of ``seed`` (0: training data, 1: held-out data)."""
    return torch.Generator().manual_seed(2 * seed + stream)


class WorkloadModule(LightningModule, ABC):
    """A ``LightningModule`` with one loss, an optimizer chosen by name and a stated divergence threshold.

    Subclasses implement :meth:`compute_loss`; ``training_step`` logs it as ``train_loss`` and ``validation_step``
    as ``val_loss``. A run whose held-out loss is above :attr:`divergence_threshold` (or not finite) counts as
    diverged in :func:`evaluate`.

    Args:
        lr: learning rate.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum in ``[0, 1)``; ignored by Adam.
    """

    divergence_threshold: float

    def __init__(self, lr: float, optimizer: str, momentum: float) -> None:
        super().__init__()
        _check_positive_float("lr", lr)
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"Expected `optimizer` to be one of {_OPTIMIZERS} but got {optimizer!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"Expected `momentum` to be a number in [0, 1) but got {momentum!r}")
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.momentum = float(momentum)

    @abstractmethod
    def compute_loss(self, batch: Any) -> Tensor:
        """The mean loss of ``batch`` as a scalar tensor."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.compute_loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class WorkloadData(LightningDataModule, ABC):
    """A ``LightningDataModule`` over a training set and a fixed held-out set, both built in memory.

    The training loader shuffles with a generator seeded from ``seed``, so two datamodules with the same arguments
    yield the same batches in the same order.

    Args:
        batch_size: samples per batch.
        seed: seed of the data generators (a non-negative integer).
    """

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        _check_non_negative_int("seed", seed)
        self.batch_size = batch_size
        self.seed = seed
        self._train: Optional[Dataset] = None
        self._val: Optional[Dataset] = None

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """The ``(train, held_out)`` datasets."""

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is None:
            self._train, self._val = self.build_datasets()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self._train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=_generator(self.seed, 0),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._val, batch_size=self.batch_size, shuffle=False)


# ---------------------------------------------------------------------------------------------------------------
# rnn: vanilla ReLU RNN on the adding problem
# ---------------------------------------------------------------------------------------------------------------


class AddingProblemData(WorkloadData):
    """The adding problem: inputs ``(seq_len, 2)``, target the sum of the two marked values.

    Channel 1 is 1 at one position drawn uniformly from the first half and one from the second half, 0 elsewhere;
    channel 0 holds a value drawn uniformly from ``[0, 1)`` at the two marked positions. Unlike the original task,
    the unmarked positions carry 0 rather than distracting values: the network need not learn to gate its input,
    only to carry two numbers across up to ``seq_len`` steps, which takes hundreds of steps rather than tens of
    thousands. Always predicting 1 gives an MSE of ``1/6`` (plus ``noise_std ** 2``).

    Args:
        seq_len: sequence length (at least 2).
        num_train: training sequences.
        num_val: held-out sequences.
        batch_size: sequences per batch.
        seed: seed of the data generators.
        noise_std: standard deviation of Gaussian noise added to the targets, an error floor that no model goes
            below (0: none).
    """

    def __init__(
        self,
        seq_len: int = 150,
        num_train: int = 8192,
        num_val: int = 1024,
        batch_size: int = 64,
        seed: int = 0,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__(batch_size, seed)
        _check_positive_int("seq_len", seq_len)
        if seq_len < 2:
            raise ValueError(f"Expected `seq_len` to be at least 2 but got {seq_len!r}")
        _check_positive_int("num_train", num_train)
        _check_positive_int("num_val", num_val)
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not 0 <= noise_std < math.inf:
            raise ValueError(f"Expected `noise_std` to be a non-negative finite number but got {noise_std!r}")
        self.seq_len = seq_len
        self.num_train = num_train
        self.num_val = num_val
        self.noise_std = float(noise_std)

    def _sample(self, n: int, generator: torch.Generator) -> TensorDataset:
        values = torch.rand(n, self.seq_len, generator=generator)
        half = self.seq_len // 2
        first = torch.randint(0, half, (n,), generator=generator)
        second = torch.randint(half, self.seq_len, (n,), generator=generator)
        markers = torch.zeros(n, self.seq_len)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        if self.noise_std:
            target = target + self.noise_std * torch.randn(n, generator=generator)
        return TensorDataset(torch.stack((values * markers, markers), dim=-1), target)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        return (
            self._sample(self.num_train, _generator(self.seed, 0)),
            self._sample(self.num_val, _generator(self.seed, 1)),
        )


class LongRangeRNN(WorkloadModule):
    """A one-layer ReLU RNN with identity recurrent weights (IRNN) and a linear read-out of the last state.

    Args:
        hidden_size: recurrent state size.
        recurrent_gain: the recurrent matrix starts as ``recurrent_gain * I`` (biases at 0).
        input_std: the input weights start as ``N(0, input_std**2)``.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
    """

    divergence_threshold = 1.0 / 6.0
    """The MSE of the trivial predictor: a run that ends above it learned nothing."""

    def __init__(
        self,
        hidden_size: int = 64,
        recurrent_gain: float = 1.0,
        input_std: float = 1.0,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.9,
    ) -> None:
        super().__init__(lr, optimizer, momentum)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_float("recurrent_gain", recurrent_gain)
        _check_positive_float("input_std", input_std)
        self.save_hyperparameters()
        self.rnn = nn.RNN(2, hidden_size, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(recurrent_gain * torch.eye(hidden_size))
            self.rnn.weight_ih_l0.normal_(0.0, input_std)
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.rnn(x)
        return self.head(states[:, -1]).squeeze(-1)

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, target = batch
        return F.mse_loss(self(x), target)


# ---------------------------------------------------------------------------------------------------------------
# transformer: character-level LM on the Python standard library sources
# ---------------------------------------------------------------------------------------------------------------

_UNKNOWN = 0
_NEWLINE = 1
VOCAB_SIZE = 2 + (127 - 32)
"""Token 0 stands for any byte outside printable ASCII and newline, 1 for ``\\n``, 2.. for bytes 32..126."""


def _byte_table() -> Tensor:
    table = torch.full((256,), _UNKNOWN, dtype=torch.long)
    table[ord("\n")] = _NEWLINE
    table[32:127] = torch.arange(2, VOCAB_SIZE)
    return table


def stdlib_text(max_chars: int) -> bytes:
    """The first ``max_chars`` bytes of the top-level standard-library ``*.py`` files, sorted by name."""
    _check_positive_int("max_chars", max_chars)
    root = os.path.dirname(os.__file__)
    chunks: list[bytes] = []
    total = 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    return b"".join(chunks)[:max_chars]


class _Windows(Dataset):
    """``(x, y)`` pairs of ``context`` tokens and the same window shifted by one, starting every ``stride`` tokens."""

    def __init__(self, tokens: Tensor, context: int, stride: int) -> None:
        self.tokens = tokens
        self.context = context
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.context - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.stride
        window = self.tokens[start : start + self.context + 1]
        return window[:-1], window[1:]


class StdlibTextData(WorkloadData):
    """Character windows from the Python standard library sources (see :func:`stdlib_text`).

    The text is tokenised into :data:`VOCAB_SIZE` symbols (printable ASCII, newline, and one unknown symbol). The
    first ``1 - val_fraction`` of it is for training, with a window starting at every position; the rest is cut into
    non-overlapping held-out windows, at most ``num_val`` of them.

    Args:
        context: tokens per window.
        max_chars: characters of source text to read.
        val_fraction: share of the text held out, in ``(0, 1)``.
        num_val: at most this many held-out windows.
        batch_size: windows per batch.
        seed: seed of the shuffling generator (the text itself is fixed).
    """

    def __init__(
        self,
        context: int = 64,
        max_chars: int = 1_000_000,
        val_fraction: float = 0.1,
        num_val: int = 256,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        _check_positive_int("context", context)
        _check_positive_int("max_chars", max_chars)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"Expected `val_fraction` to be a number in (0, 1) but got {val_fraction!r}")
        _check_positive_int("num_val", num_val)
        self.context = context
        self.max_chars = max_chars
        self.val_fraction = float(val_fraction)
        self.num_val = num_val

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        text = stdlib_text(self.max_chars)
        tokens = _byte_table()[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
        split = int(len(tokens) * (1 - self.val_fraction))
        train, held_out = tokens[:split], tokens[split:]
        for part, name in ((train, "training"), (held_out, "held-out")):
            if len(part) < self.context + 1:
                raise ValueError(
                    f"The {name} text has {len(part)} tokens, fewer than `context + 1` = {self.context + 1};"
                    " increase `max_chars`"
                )
        val = _Windows(held_out, self.context, self.context)
        return _Windows(train, self.context, 1), Subset(val, range(min(len(val), self.num_val)))


class CharTransformerLM(WorkloadModule):
    """A causal post-LayerNorm transformer over characters, with learned positions, no dropout and no warm-up.

    Args:
        vocab_size: number of token ids (:data:`VOCAB_SIZE` for :class:`StdlibTextData`).
        context: the longest input, in tokens.
        d_model: embedding width.
        num_heads: attention heads.
        num_layers: transformer layers.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
    """

    divergence_threshold = 2.5
    """In nats, between the unigram (about 3.1) and bigram (about 2.3) entropy of the text: a run that ends above
    it learned little more than character frequencies."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        context: int = 64,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        lr: float = 1.0,
        optimizer: str = "sgd",
        momentum: float = 0.9,
    ) -> None:
        super().__init__(lr, optimizer, momentum)
        for name, value in (
            ("vocab_size", vocab_size),
            ("context", context),
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
        ):
            _check_positive_int(name, value)
        if d_model % num_heads:
            raise ValueError(f"Expected `d_model` ({d_model}) to be divisible by `num_heads` ({num_heads})")
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.position.shape[0]:
            raise ValueError(f"Expected at most {self.position.shape[0]} tokens per sequence but got {length}")
        h = self.embed(tokens) + self.position[:length]
        h = self.encoder(h, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(h)

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---------------------------------------------------------------------------------------------------------------
# mlp: deep unnormalised MLP on Gaussian clusters
# ---------------------------------------------------------------------------------------------------------------


class GaussianBlobsData(WorkloadData):
    """Classification of points around ``num_classes`` random centres: ``x = centre[y] + N(0, I)``.

    Labels are uniform; the centres are drawn from ``N(0, separation**2 I)`` with the training stream, so at the
    default ``separation`` in 32 dimensions the classes barely overlap and a network that trains at all reaches a
    low loss quickly.

    Args:
        input_dim: input features.
        num_classes: classes.
        separation: standard deviation of the class centres, in units of the within-class noise.
        num_train: training samples.
        num_val: held-out samples.
        batch_size: samples per batch.
        seed: seed of the data generators.
    """

    def __init__(
        self,
        input_dim: int = 32,
        num_classes: int = 10,
        separation: float = 1.0,
        num_train: int = 16384,
        num_val: int = 2048,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        for name, value in (
            ("input_dim", input_dim),
            ("num_classes", num_classes),
            ("num_train", num_train),
            ("num_val", num_val),
        ):
            _check_positive_int(name, value)
        _check_positive_float("separation", separation)
        self.input_dim = input_dim
        self.num_classes = num_classes
        self.separation = float(separation)
        self.num_train = num_train
        self.num_val = num_val

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        train_gen = _generator(self.seed, 0)
        centres = self.separation * torch.randn(self.num_classes, self.input_dim, generator=train_gen)

        def sample(n: int, generator: torch.Generator) -> TensorDataset:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator)
            return TensorDataset(centres[labels] + torch.randn(n, self.input_dim, generator=generator), labels)

        return sample(self.num_train, train_gen), sample(self.num_val, _generator(self.seed, 1))


class DeepMLP(WorkloadModule):
    """``depth`` layers of ``Linear + ReLU`` and a linear classifier, no normalisation, Gaussian init with ``gain``.

    Each hidden weight is drawn from ``N(0, gain**2 / fan_in)``; ``gain = sqrt(2)`` (He) keeps activations at a
    constant scale through ReLU layers, larger gains grow them by ``gain / sqrt(2)`` per layer.

    Args:
        input_dim: input features.
        num_classes: classes.
        width: hidden width.
        depth: hidden layers.
        gain: initialisation gain.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
    """

    divergence_threshold = math.log(10)
    """The cross entropy of chance, ``log(num_classes)`` (the class attribute is for the default ten classes): a
    run that ends above it learned nothing."""

    def __init__(
        self,
        input_dim: int = 32,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 32,
        gain: float = 1.6,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
    ) -> None:
        super().__init__(lr, optimizer, momentum)
        for name, value in (("input_dim", input_dim), ("num_classes", num_classes), ("width", width), ("depth", depth)):
            _check_positive_int(name, value)
        _check_positive_float("gain", gain)
        self.save_hyperparameters()
        self.divergence_threshold = math.log(num_classes)
        layers: list[nn.Module] = []
        fan_in = input_dim
        for _ in range(depth):
            linear = nn.Linear(fan_in, width)
            nn.init.normal_(linear.weight, 0.0, gain / math.sqrt(fan_in))
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------

WORKLOADS: dict[str, tuple[type[WorkloadModule], type[WorkloadData], dict[str, Any], dict[str, Any]]] = {
    "rnn": (LongRangeRNN, AddingProblemData, {"num_train": 4096}, {"hidden_size": 128, "num_train": 16384}),
    "transformer": (
        CharTransformerLM,
        StdlibTextData,
        {"max_chars": 300_000},
        {"context": 128, "max_chars": 1_000_000},
    ),
    "mlp": (DeepMLP, GaussianBlobsData, {"num_train": 8192}, {"width": 256, "num_train": 32768}),
}
"""``name -> (module class, datamodule class, test-size kwargs, full-size kwargs)``.

The kwargs of either size are split between the two classes by argument name (a name both take, like ``context``,
goes to both). :func:`build_workload` fills in everything else from the class defaults.
"""


def build_workload(
    name: str, size: str = "test", seed: int = 0, **overrides: Any
) -> tuple[WorkloadModule, WorkloadData]:
    """A ``(module, datamodule)`` pair from :data:`WORKLOADS`.

    The global RNGs are seeded with ``seed`` before the module is built, so its initial weights are fixed, and the
    datamodule gets ``seed`` as well.

    Args:
        name: a key of :data:`WORKLOADS`.
        size: ``"test"`` or ``"full"``.
        seed: seeds the module initialisation and the data.
        overrides: constructor arguments of either class, applied over the size's kwargs.
    """
    if name not in WORKLOADS:
        raise ValueError(f"Expected `name` to be one of {sorted(WORKLOADS)} but got {name!r}")
    if size not in ("test", "full"):
        raise ValueError(f"Expected `size` to be 'test' or 'full' but got {size!r}")
    module_cls, data_cls, test_kwargs, full_kwargs = WORKLOADS[name]
    kwargs = {**(test_kwargs if size == "test" else full_kwargs), **overrides}
    module_args = set(_init_args(module_cls))
    data_args = set(_init_args(data_cls)) - {"seed"}
    unknown = set(kwargs) - module_args - data_args
    if unknown:
        raise ValueError(f"Unknown arguments for workload {name!r}: {sorted(unknown)}")
    seed_everything(seed, verbose=False)
    module = module_cls(**{k: v for k, v in kwargs.items() if k in module_args})
    datamodule = data_cls(seed=seed, **{k: v for k, v in kwargs.items() if k in data_args})
    return module, datamodule


def _init_args(cls: type) -> list[str]:
    return list(inspect.signature(cls).parameters)


@torch.no_grad()
def evaluate(module: WorkloadModule, datamodule: WorkloadData) -> dict[str, Any]:
    """Mean loss of ``module`` over the datamodule's held-out set, and whether the run diverged.

    Returns:
        ``{"final_loss": float, "diverged": bool}``. ``diverged`` is true when a parameter is not finite, the loss
        is not finite, or the loss is above ``module.divergence_threshold``.
    """
    was_training = module.training
    module.eval()
    mean = MeanMetric().set_dtype(torch.float64)  # the batch means weighted by batch size, summed in float64
    try:
        for batch in datamodule.val_dataloader():
            batch = [t.to(module.device) for t in batch]
            mean.update(module.compute_loss(batch).detach().double().cpu(), weight=batch[0].shape[0])
    finally:
        module.train(was_training)
    loss = float(mean.compute())
    finite_params = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    diverged = not (finite_params and math.isfinite(loss) and loss <= module.divergence_threshold)
    return {"final_loss": loss, "diverged": diverged}
