"""Low-bit gradient quantizers with error feedback, vectorised over whole groups of tensors, without host syncs.

Methods (formulas in ``shared/ANCHORS.md``):

- ``"stochastic"``: blockwise k-bit stochastic rounding. Per block of ``block_size`` elements,
  ``scale = max |g|`` and ``q = round_stochastic(g / scale * L) * scale / L`` with ``L = 2**(k-1) - 1`` levels on
  each side of zero. Unbiased.
- ``"qsgd"``: QSGD (Alistarh et al., 2017) with ``s`` levels, scaled by the L2 norm of each block ("bucket" in the
  paper): ``Q(v_i) = ||v|| * sign(v_i) * xi_i(v, s)``. Unbiased; variance ``<= min(d / s**2, sqrt(d) / s) * ||v||**2``
  per bucket of ``d`` elements.
- ``"terngrad"``: TernGrad (Wen et al., 2017). Per tensor: clip to ``+-c * sigma`` (``c = 2.5``), then
  ``max|g| * sign(g) * Bernoulli(|g| / max|g|)``. Unbiased on the clipped gradient.
- ``"sign"``: scaled sign with error feedback (Karimireddy et al., 2019). Per tensor:
  ``p = g + e; delta = ||p||_1 / d * sign(p); e <- p - delta``.

Error feedback (any method): the quantizer's input is ``p = g + e`` and the residual ``e <- p - Q(p)`` is carried to
the next call, so over ``T`` calls ``sum(Q) = sum(g) - e_T`` (the identity is tested).

Outlier bound, the quantizer's own guard against explosions: before quantizing, ``|g|`` is clamped per tensor to
``clamp_sigma * sigma`` (``sigma`` the root mean square of the tensor, i.e. its standard deviation about zero, so a
gradient with a large common offset, a bias for instance, is not clipped away) or to the ``clamp_quantile``-quantile
of ``|g|``, estimated from ``QUANTILE_SAMPLES`` elements per tensor drawn with the quantizer's generator
(``torch.quantile`` has input-size limits and an exact per-tensor selection would need one call per tensor).
One exploding element then cannot flatten the scale of its whole block. What the bound removes is dropped, as
clipping drops it: it does not enter the error-feedback residual.

Layout. Tensors are grouped by (device, dtype, shard) and copied into one zero-padded float buffer of shape
``(num_blocks, block_size)`` per group, each tensor starting on a block boundary, so that every step is a fixed
number of operations per group and chunk (below) whatever the number of tensors; per-tensor statistics are
segment reductions over the per-block ones. The buffers are kept between calls (allocating them anew costs more than the
arithmetic on the CPU).

Chunks. On the CPU the passes are memory-bound: each whole-buffer pass would stream the buffers from main memory.
So the passes go over runs of whole tensors of about ``CHUNK_ELEMENTS`` elements per thread (the size of a core's
cache) one run after the other: a first sweep copies a chunk in and takes its per-block statistics, then, once the
per-tensor decisions (finite or not, outlier bound, scales) are taken for the whole group, a second sweep quantizes
each chunk, gathers its output rows and copies them out while the chunk is still in the cache. Elementwise
operations and per-row reductions give the same values whatever the chunks, so the chunking changes no result.

Randomness. Every draw (the dither below, the quantile samples) comes from the generator of the group's device
seeded with :func:`derive_seed` of ``(seed, step, stream, group index, shard coordinate)``: a pure function of
values every rank knows, so

- under DDP (identical gradients after the all-reduce, no shard coordinate) every rank draws the same numbers and
  replicated parameters stay bitwise identical;
- under FSDP2 each rank quantizes its local shard with blocks aligned to the shard's start, seeded with its
  coordinate on the sharded mesh dimensions: distinct shards draw independent numbers, replicas of one shard
  (HSDP) draw the same ones, and no collective is needed;
- a resumed run draws what an uninterrupted one would have drawn: the generator state is ``(seed, step)``.

Dither. Stochastic rounding is ``round(y + d)`` with ``d`` uniform in ``[-1/2, 1/2)`` (float32). On the CPU the
generator, not the arithmetic, would dominate the cost (``torch.rand`` alone costs three times
``clip_grad_norm_``), so each group keeps a table of ``N + M`` uniform values (``N`` its padded size,
``M = min(N, DITHER_SPAN)``), and step ``t`` reads the ``N`` values at a random offset in ``[0, M]``. One
``DITHER_REFRESH``-th of the table is redrawn every step (slice ``t % DITHER_REFRESH``, seeded by ``t``), so every
value lives ``DITHER_REFRESH`` steps and the table is a pure function of the step: a resumed run rebuilds it
exactly. Within a step all dithers are distinct draws, so each step's rounding is unbiased; an element's dithers at
two steps are distinct draws unless the two offsets coincide (probability ``1 / (M + 1)``), so its rounding errors
are independent from step to step.

Non-finite gradients. A tensor with any NaN or Inf (or whose squared norm overflows float32) is left bitwise
untouched and neither consumes nor updates its residual; the choice is made on the device (a fixed-size gather of
rows, each from the quantized values or from the input, and likewise for the residual), never read on the host.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import Tensor

import itertools
from collections import defaultdict

from lightning_gradguard.functional.norms import as_local_tensor
from lightning_gradguard.utilities import device_tensor

__all__ = [
    "METHODS",
    "DITHER_REFRESH",
    "DITHER_SPAN",
    "CHUNK_ELEMENTS",
    "QUANTILE_SAMPLES",
    "TERNGRAD_CLAMP_SIGMA",
    "GradientQuantizer",
    "QuantizationStats",
    "derive_seed",
    "levels_for_bits",
    "quantize",
    "shard_coordinate",
]

Method = Literal["stochastic", "qsgd", "terngrad", "sign"]
Rounding = Literal["stochastic", "nearest"]
METHODS: tuple[str, ...] = ("stochastic", "qsgd", "terngrad", "sign")
ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
TERNGRAD_CLAMP_SIGMA = 2.5
QUANTILE_SAMPLES = 1024
_TOPK_SAMPLES = 32  # below this many samples above the quantile, topk selects it faster than kthvalue

DITHER_SPAN = 1 << 17
DITHER_REFRESH = 32
# elements per chunk and per thread on the CPU (1 MiB of float32: a core's L2 cache); measured on the benchmark
# model, 2**17 and 2**20 were slower (more Python calls, cache misses)
CHUNK_ELEMENTS = 1 << 18
# on accelerators chunks only bound the size of the output scratch buffer (64 MiB of float32)
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 24
_DITHER_SALT = 0x5D17
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


class Segments:
    """Consecutive segments of a vector, given by their lengths, and their sums (or maxima), the same bits on every
    run: ranks that hold the same gradients must take the same decisions (``index_add_`` adds in a varying order on
    CUDA). Used for the per-tensor sums of unit norms and of quantization blocks.

    On the CPU a reduction is one ``segment_reduce`` (``unsafe``: no check of the lengths, which would read them on
    the host). CUDA's ``segment_reduce`` walks each segment in a single thread, slow for the thousands of rows of a
    large weight, so there (or with ``grouped=True``) the segments of each distinct length are gathered into a
    matrix and reduced along its rows instead: two kernels per distinct length. Built once per layout.
    """

    def __init__(self, lengths: Sequence[int], device: torch.device, grouped: Optional[bool] = None) -> None:
        device = torch.device(device)
        self.grouped = device.type == "cuda" if grouped is None else grouped
        self.lengths = None if self.grouped else device_tensor(list(lengths), dtype=torch.long, device=device)
        self.groups: list[tuple[int, int, Tensor]] = []  # (segments, their length, where their elements are)
        self.inverse: Optional[Tensor] = None  # from the grouped order back to the input order (None: the same)
        if self.grouped:
            starts = [0, *itertools.accumulate(lengths)][:-1]
            by_length: dict[int, list[int]] = defaultdict(list)
            for i, n in enumerate(lengths):
                by_length[n].append(i)
            order: list[int] = []
            for n, ids in by_length.items():
                index = [starts[i] + j for i in ids for j in range(n)]
                self.groups.append((len(ids), n, device_tensor(index, dtype=torch.long, device=device)))
                order += ids
            if order != sorted(order):
                inverse = [0] * len(order)
                for position, i in enumerate(order):
                    inverse[i] = position
                self.inverse = device_tensor(inverse, dtype=torch.long, device=device)

    def sum(self, values: Tensor) -> Tensor:
        """The sum of each segment of the 1-D ``values``."""
        return self.reduce(values, "sum")

    def reduce(self, values: Tensor, how: Literal["sum", "max"] = "sum") -> Tensor:
        """The sum, or the maximum (at least 0, as ``segment_reduce`` with ``initial=0``), of each segment of the
        1-D ``values``; 0 for an empty segment."""
        if not self.grouped:
            return torch.segment_reduce(values, how, lengths=self.lengths, unsafe=True, initial=0.0)
        parts = [_reduce_rows(values.index_select(0, index).view(k, n), how) for k, n, index in self.groups]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out if self.inverse is None else out.index_select(0, self.inverse)


def _reduce_rows(matrix: Tensor, how: str) -> Tensor:
    if how == "sum":
        return matrix.sum(1)
    if matrix.shape[1] == 0:
        return matrix.new_zeros(matrix.shape[0])
    return matrix.amax(1).clamp(min=0.0)




def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys with the SplitMix64 finaliser (host integer arithmetic only).

    Example::

        >>> derive_seed(0, 1) == derive_seed(0, 1)
        True
        >>> derive_seed(0, 1) == derive_seed(1, 0)
        False
    """
    state = 0
    for key in keys:
        z = (state ^ (int(key) & _MASK64)) + _GOLDEN64 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def levels_for_bits(bits: int) -> int:
    """Quantization levels on each side of zero for a signed ``bits``-bit code: ``2**(bits-1) - 1``.

    Example::

        >>> levels_for_bits(8), levels_for_bits(2)
        (127, 1)
    """
    return 2 ** (bits - 1) - 1


def shard_coordinate(t: Tensor) -> tuple[int, ...]:
    """This rank's coordinate on the mesh dimensions along which the ``DTensor`` ``t`` is sharded; ``()`` for a
    plain tensor (and for replicated dimensions, so that replicas of a shard draw the same random numbers)."""
    if DTensor is None or not isinstance(t, DTensor):
        return ()
    coordinate = t.device_mesh.get_coordinate() or []
    return tuple(int(coordinate[d]) for d, placement in enumerate(t.placements) if placement.is_shard())


@dataclass
class QuantizationStats:
    """Device scalars describing one call: squared quantization error and squared input norm (over the tensors
    that were quantized), elements clamped by the outlier bound, and elements quantized."""

    error_sq: Tensor
    input_sq: Tensor
    clamped: Tensor
    numel: Tensor

    @property
    def rel_error(self) -> Tensor:
        """``||Q(p) - p|| / ||p||`` where ``p`` is the quantizer's input after the outlier bound (0 for ``p = 0``)."""
        # input_sq = 0 means error_sq = 0: the clamp turns 0 / 0 into 0
        return (self.error_sq / self.input_sq.clamp(min=torch.finfo(self.input_sq.dtype).tiny)).sqrt()

    @property
    def clamped_fraction(self) -> Tensor:
        """Fraction of the quantized elements that the outlier bound clamped."""
        return self.clamped / self.numel.clamp(min=1)


def _check_int(value: Any, name: str, low: int, high: Optional[int] = None) -> int:
    expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be {expected} but got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"Expected `{name}` to be {expected} but got {value!r}")
    return value


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices} but got {value!r}")
    return value


def _check_real(value: Any, name: str, expected: str, valid: bool) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be {expected} or None but got {type(value).__name__}")
    if not valid:
        raise ValueError(f"Expected `{name}` to be {expected} or None but got {value!r}")
    return float(value)


def _chunks(blocks: list[int], target: int) -> list[tuple[int, int, int, int]]:
    """Split a layout into runs of whole tensors of at most ``target`` blocks (a larger tensor is a run of its
    own): ``(first row, end row, first tensor, end tensor)`` of each run. Every tensor is in one run."""
    chunks: list[tuple[int, int, int, int]] = []
    r0 = i0 = rows = 0
    for i, b in enumerate(blocks):
        if rows > r0 and rows + b - r0 > target:
            chunks.append((r0, rows, i0, i))
            r0, i0 = rows, i
        rows += b
    if i0 < len(blocks):
        chunks.append((r0, rows, i0, len(blocks)))
    return chunks


class _Chunk(NamedTuple):
    """Views of the rows of one chunk (see ``CHUNK_ELEMENTS``) in its group's buffers, made with the layout."""

    tensors: slice  # its tensors, in the group's order
    x: Tensor
    source: Tensor  # the quantizer's input: x, or y with error feedback
    residual: Optional[Tensor]
    q: Tensor  # where its quantized values go: y, or with error feedback the chunk-sized q rows of `work`
    out: Tensor  # the gathered output rows
    x_views: list[Tensor]
    out_views: list[Tensor]
    stats: tuple[Tensor, ...]  # its slices of the group's per-block statistics


class _Group:
    """The padded block layout of the tensors of one (device, dtype, shard) group, with its reusable buffers."""

    def __init__(
        self,
        index: int,
        names: list[str],
        tensors: list[Tensor],
        specs: list[Optional[tuple]],
        shard: tuple[int, ...],
        block_size: int,
        with_residual: bool,
        with_dither: bool,
    ) -> None:
        self.index = index
        self.names = names
        self.specs = specs
        self.shard = shard
        self.dtype = tensors[0].dtype
        device = tensors[0].device
        compute = torch.float64 if self.dtype == torch.float64 else torch.float32
        sizes = [t.numel() for t in tensors]
        blocks = [-(-n // block_size) for n in sizes]
        self.num_blocks = sum(blocks)
        self.numel_total = self.num_blocks * block_size
        n = self.num_blocks
        # runs of whole tensors that every pass goes through one after the other (see `CHUNK_ELEMENTS`)
        per_chunk = CHUNK_ELEMENTS * torch.get_num_threads() if device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
        bounds = _chunks(blocks, max(per_chunk // block_size, 1))
        self.chunk_sizes = [r1 - r0 for r0, r1, _, _ in bounds]
        chunk_rows = max(self.chunk_sizes, default=0)
        # the input x, the work buffer y, with error feedback the residual and the chunk's quantized values q, all
        # rows of one buffer so that a single row gather picks each output row from any of them (index_select,
        # several times faster than torch.where on the CPU). The padding stays zero: quantizing, clamping and
        # subtracting zeros gives zeros.
        self.work = torch.zeros(
            (3 * n + chunk_rows) if with_residual else 2 * n, block_size, dtype=compute, device=device
        )
        self.x, self.y = self.work[:n], self.work[n : 2 * n]
        self.residual = self.work[2 * n : 3 * n] if with_residual else None
        # the gathered output rows of a chunk; its own buffer, as a gather may not write over its input
        out = torch.empty(chunk_rows, block_size, dtype=compute, device=device)
        # per block: amax, amin, L2 norm, L2 norm of the error, elements clamped, L1 norm (method "sign")
        self.block_stats = torch.empty(6, n, dtype=compute, device=device)
        shapes = [t.shape for t in tensors]
        self.x_views = self._views(self.x, sizes, blocks, shapes)
        self.residual_views = self._views(self.residual, sizes, blocks, shapes) if with_residual else []
        self.chunks = [
            _Chunk(
                slice(i0, i1),
                self.x[r0:r1],
                (self.y if with_residual else self.x)[r0:r1],
                self.residual[r0:r1] if self.residual is not None else None,
                self.work[3 * n :][: r1 - r0] if with_residual else self.y[r0:r1],
                out[: r1 - r0],
                self.x_views[i0:i1],
                self._views(out[: r1 - r0], sizes[i0:i1], blocks[i0:i1], shapes[i0:i1]),
                self.block_stats[:, r0:r1].unbind(),
            )
            for r0, r1, i0, i1 in bounds
        ]
        # the row of `work` that holds a block's quantized value: in y, or with error feedback in q
        row_start = [r0 for r0, r1, _, _ in bounds for _ in range(r0, r1)]
        quantized = [3 * n + r - r0 for r, r0 in enumerate(row_start)] if with_residual else range(n, 2 * n)
        self.quantized_rows = device_tensor(quantized, dtype=torch.long, device=device)
        starts = [0]
        for b in blocks[:-1]:
            starts.append(starts[-1] + b * block_size)
        segment = [i for i, b in enumerate(blocks) for _ in range(b)]
        self.segment = device_tensor(segment, dtype=torch.long, device=device)
        self.segments = Segments(blocks, device)  # each tensor's blocks
        self.rows = torch.arange(self.num_blocks, device=device)
        self.starts = device_tensor(starts, dtype=torch.long, device=device)
        self.last_offset = device_tensor([max(n - 1, 0) for n in sizes], dtype=torch.long, device=device)
        self.numel = device_tensor(sizes, dtype=compute, device=device)
        self.dither_span = min(self.numel_total, DITHER_SPAN)
        table_size = self.numel_total + self.dither_span if with_dither else 0
        self.dither_table = torch.empty(table_size, dtype=compute, device=device)
        self.dither_slice = -(-table_size // DITHER_REFRESH)
        self.dither_step: Optional[int] = None  # the step the table was last brought up to
        self.zero = torch.zeros((), dtype=compute, device=device)

    @staticmethod
    def _views(buffer: Tensor, sizes: list[int], blocks: list[int], shapes: list[torch.Size]) -> list[Tensor]:
        pieces = buffer.view(-1).split([b * buffer.shape[1] for b in blocks])
        return [piece[:n].view(shape) for piece, n, shape in zip(pieces, sizes, shapes)]

    def per_tensor(self, per_block: Tensor, reduce: Literal["sum", "max"] = "sum") -> Tensor:
        # deterministic on every device: ranks must agree bitwise (see Segments)
        return self.segments.reduce(per_block.to(self.numel.dtype), reduce)

    def per_block(self, per_tensor: Tensor) -> Tensor:
        return per_tensor.index_select(0, self.segment)

    def dither(self, step: int, keys: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """The step's dither, ``(num_blocks, block_size)`` uniform values in ``[-1/2, 1/2)``: the table (redrawn
        one slice per step) read at an offset drawn from ``(step, keys)``."""
        last = self.dither_step
        first = step - DITHER_REFRESH + 1 if last is None or not 0 <= step - last < DITHER_REFRESH else last + 1
        for t in range(first, step + 1):  # one slice per step; all of them when the table is new or stale
            part = self.dither_table[(t % DITHER_REFRESH) * self.dither_slice :][: self.dither_slice]
            generator.manual_seed(derive_seed(_DITHER_SALT, t, *keys))
            part.uniform_(-0.5, 0.5, generator=generator)
        self.dither_step = step
        offset = derive_seed(_DITHER_SALT, -1, step, *keys) % (self.dither_span + 1)
        return self.dither_table[offset : offset + self.numel_total].view(self.x.shape)


class GradientQuantizer:
    r"""Quantize lists of gradients in place, with optional error feedback, for any training loop.

    Args:
        method: ``"stochastic"`` (blockwise k-bit), ``"qsgd"``, ``"terngrad"`` or ``"sign"`` (see the module
            docstring for the formulas).
        bits: code width of ``"stochastic"``, 2 to 8: ``2**(bits-1) - 1`` levels on each side of zero.
        levels: ``s``, the number of levels of ``"qsgd"`` (default: ``2**(bits-1) - 1``); only for ``"qsgd"``.
        block_size: elements per block (``"stochastic"``: one scale per block; ``"qsgd"``: the bucket of the norm).
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"`` (deterministic, ties to even); not for ``"sign"``.
        error_feedback: carry the residual ``p - Q(p)`` to the next call. Default: on for ``"sign"`` (where it
            cannot be turned off), off otherwise.
        clamp_sigma: clamp ``|g|`` per tensor to ``clamp_sigma`` times its root mean square before quantizing.
            Default: 2.5 for ``"terngrad"`` (its clipping step), none otherwise.
        clamp_quantile: clamp ``|g|`` per tensor to this quantile of ``|g|`` in ``(0, 1]`` (estimated from
            ``QUANTILE_SAMPLES`` random elements per tensor) instead; exclusive with ``clamp_sigma``.
        seed: base seed of the random draws; the draws of a call depend only on ``(seed, step, stream)``.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or out of range.

    Example::

        >>> import torch
        >>> quantizer = GradientQuantizer("sign")
        >>> grads = [torch.tensor([0.5, -1.0, 0.25, 2.0])]
        >>> stats = quantizer.quantize_(grads, step=0)
        >>> grads[0]
        tensor([ 0.9375, -0.9375,  0.9375,  0.9375])
        >>> quantizer.residuals()["0"]
        tensor([-0.4375, -0.0625, -0.6875,  1.0625])
    """

    def __init__(
        self,
        method: Method = "stochastic",
        bits: int = 8,
        levels: Optional[int] = None,
        block_size: int = 2048,
        rounding: Rounding = "stochastic",
        error_feedback: Optional[bool] = None,
        clamp_sigma: Optional[float] = None,
        clamp_quantile: Optional[float] = None,
        seed: int = 0,
    ) -> None:
        self.method = _check_choice(method, "method", METHODS)
        self.bits = _check_int(bits, "bits", 2, 8)
        if levels is not None:
            _check_int(levels, "levels", 1)
            if method != "qsgd":
                raise ValueError(
                    f"`levels` applies to method='qsgd' only but got levels={levels} with method={method!r}"
                )
        self.levels = levels if levels is not None else (1 if method == "terngrad" else levels_for_bits(bits))
        self.block_size = _check_int(block_size, "block_size", 1)
        self.rounding = _check_choice(rounding, "rounding", ROUNDINGS)
        if method == "sign" and rounding != "stochastic":
            raise ValueError(f"method='sign' has no rounding step but got rounding={rounding!r}")
        if error_feedback is not None and not isinstance(error_feedback, bool):
            raise TypeError(f"Expected `error_feedback` to be a bool or None but got {type(error_feedback).__name__}")
        if method == "sign" and error_feedback is False:
            raise ValueError("method='sign' always uses error feedback but got error_feedback=False")
        self.error_feedback = method == "sign" or bool(error_feedback)
        sigma_ok = isinstance(clamp_sigma, (int, float)) and math.isfinite(clamp_sigma) and clamp_sigma > 0
        self.clamp_sigma = _check_real(clamp_sigma, "clamp_sigma", "a positive finite number", sigma_ok)
        quantile_ok = isinstance(clamp_quantile, (int, float)) and 0 < clamp_quantile <= 1
        self.clamp_quantile = _check_real(clamp_quantile, "clamp_quantile", "a number in (0, 1]", quantile_ok)
        if self.clamp_sigma is not None and self.clamp_quantile is not None:
            raise ValueError(
                f"Expected at most one of `clamp_sigma` and `clamp_quantile` but got {clamp_sigma} and {clamp_quantile}"
            )
        if method == "terngrad" and self.clamp_sigma is None and self.clamp_quantile is None:
            self.clamp_sigma = TERNGRAD_CLAMP_SIGMA
        self.seed = _check_int(seed, "seed", 0)
        self._layouts: dict[int, tuple[tuple, list[_Group]]] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}  # residuals loaded from a checkpoint, full tensors
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------------------------------------------------
    def quantize_(
        self,
        tensors: Sequence[Optional[Tensor]],
        step: int,
        *,
        names: Optional[Sequence[str]] = None,
        stream: int = 0,
    ) -> QuantizationStats:
        """Quantize ``tensors`` in place (``DTensor``: the local shard); return the step's statistics.

        Args:
            tensors: gradients; ``None`` entries are skipped.
            step: the training step: with ``seed`` and ``stream`` it determines every random draw.
            names: a name per tensor, the key of its residual (default: the position, as a string).
            stream: tells apart several calls per step (e.g. one per optimizer): own draws, own residuals.
        """
        names = [str(i) for i in range(len(tensors))] if names is None else list(names)
        items = [(n, t, as_local_tensor(t)) for n, t in zip(names, tensors) if t is not None]
        groups = self._groups_for(stream, items)
        locals_ = [local for _, _, local in items]
        parts = []
        for group, idx in groups:
            generator = self._generator(group.x.device)
            keys = (self.seed, stream, group.index, *group.shard)
            parts.append(self._quantize_group(group, [locals_[i] for i in idx], step, keys, generator))
        device = locals_[0].device if locals_ else torch.device("cpu")
        totals = sum((p.to(device, torch.float32) for p in parts), torch.zeros(4, device=device))
        return QuantizationStats(*totals.unbind())

    def residuals(self, stream: int = 0) -> dict[str, Tensor]:
        """Copies of the error-feedback residuals of ``stream`` (local shards), by tensor name."""
        out = {name: t.clone() for name, t in self._pending.get(stream, {}).items()}
        out.update(self._layout_residuals(stream))
        return out

    def _layout_residuals(self, stream: int) -> dict[str, Tensor]:
        groups = self._layouts[stream][1] if stream in self._layouts else []
        return {name: view.clone() for group, _ in groups for name, view in zip(group.names, group.residual_views)}

    def state_dict(self) -> dict[str, Any]:
        """``seed`` and the residuals as full tensors by stream and name. Under FSDP2 the shards are gathered (a
        collective: call it on every rank, as Lightning does when it saves a checkpoint)."""
        residuals: dict[int, dict[str, Tensor]] = {s: dict(p) for s, p in self._pending.items()}
        for stream, (_, groups) in self._layouts.items():
            for group, _ in groups:
                views = zip(group.names, group.residual_views, group.specs)
                residuals.setdefault(stream, {}).update({name: _full_tensor(v, spec) for name, v, spec in views})
        return {"seed": self.seed, "residuals": residuals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self._pending = {int(s): dict(r) for s, r in state_dict.get("residuals", {}).items()}
        self._layouts.clear()  # rebuilt at the next call, importing the loaded residuals

    # ------------------------------------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _groups_for(self, stream: int, items: list[tuple[str, Tensor, Tensor]]) -> list[tuple[_Group, list[int]]]:
        """The cached layout of ``stream``, rebuilt (carrying the residuals by name) when the tensors change.
        ``items``: (name, tensor, local shard)."""
        keys = [(local.device, local.dtype, shard_coordinate(t)) for _, t, local in items]
        signature = tuple((n, tuple(local.shape), k) for (n, _, local), k in zip(items, keys))
        cached = self._layouts.get(stream)
        if cached is not None and cached[0] == signature:
            return cached[1]
        carried = self._layout_residuals(stream)
        pending = self._pending.pop(stream, {})
        members: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        groups = []
        for index, (key, idx) in enumerate(members.items()):
            group = _Group(
                index,
                [items[i][0] for i in idx],
                [items[i][2] for i in idx],
                [_spec(items[i][1]) for i in idx],
                key[2],
                self.block_size,
                with_residual=self.error_feedback,
                with_dither=self.rounding == "stochastic" and self.method != "sign",
            )
            if self.error_feedback:
                _import_residuals(group, carried, pending)
            groups.append((group, idx))
        self._layouts[stream] = (signature, groups)
        return groups

    def _quantize_group(
        self, group: _Group, tensors: list[Tensor], step: int, keys: tuple[int, ...], generator: torch.Generator
    ) -> Tensor:
        """One group: ``[error_sq, input_sq, clamped, numel]`` as a device vector. No host reads. ``keys``
        (seed, stream, group, shard coordinate) and ``step`` determine every random draw.

        Two passes over the chunks (see ``CHUNK_ELEMENTS``): the first copies the input in and takes the per-block
        statistics, the second, once the per-tensor decisions (finite or not, outlier bound, scales) are made,
        quantizes, gathers the output rows and copies them out, each chunk while it is in the cache."""
        x, residual = group.x, group.residual
        if group.num_blocks == 0:  # only empty shards (FSDP2 with fewer rows than ranks): nothing to quantize
            return torch.zeros(4, dtype=x.dtype, device=x.device)
        source = x if residual is None else group.y  # with error feedback y holds the quantizer's input p = g + e
        amax, amin, norms, error, over, l1 = group.block_stats.unbind()
        # the largest |p| of each block scales "stochastic" and "terngrad"; the others only need to know whether a
        # block is finite, which its norm tells (NaN or Inf when an element is, or when its square sum overflows)
        with_absmax = self.method in ("stochastic", "terngrad")
        sample_index = self._sample_index(group, step, keys, generator)
        if sample_index is not None:
            samples = torch.empty(sample_index.shape, dtype=x.dtype, device=x.device)
        for chunk in group.chunks:
            torch._foreach_copy_(chunk.x_views, tensors[chunk.tensors])
            if chunk.residual is not None:
                torch.add(chunk.x, chunk.residual, out=chunk.source)
            if with_absmax:
                torch.amax(chunk.source, 1, out=chunk.stats[0])
                torch.amin(chunk.source, 1, out=chunk.stats[1])
            torch.linalg.vector_norm(chunk.source, dim=1, out=chunk.stats[2])
            if self.method == "sign":
                torch.linalg.vector_norm(chunk.source, 1, dim=1, out=chunk.stats[5])
            if sample_index is not None:  # gathered while the chunk is in the cache (the positions are random)
                index, out = sample_index[chunk.tensors], samples[chunk.tensors]
                torch.index_select(source.view(-1), 0, index.view(-1), out=out.view(-1))
        absmax = torch.maximum(amax, amin.neg()) if with_absmax else group.zero
        bad_blocks = ~torch.isfinite(absmax + norms)  # both are >= 0: the sum is finite iff both are
        ok_tensor = group.per_tensor(bad_blocks) == 0
        ok = group.per_block(ok_tensor)
        bound = self._outlier_bound(group, norms, samples if sample_index is not None else None)
        bounds: list[Optional[Tensor]] = [None] * len(group.chunks)
        if bound is not None:
            # non-finite tensors get an infinite bound: clamping leaves them bitwise as they are
            bound = group.per_block(torch.where(ok_tensor, bound, torch.full_like(bound, math.inf))).unsqueeze(1)
            bounds = list(bound.split(group.chunk_sizes))
            if with_absmax:
                absmax = torch.minimum(absmax, bound.squeeze(1))  # the largest |p| after clamping, exactly
            else:  # qsgd and sign scale by norms of the clamped input: clamp first, in a pass of its own
                for chunk, chunk_bound in zip(group.chunks, bounds):
                    self._clamp_chunk(chunk, chunk_bound)
                bounds = [None] * len(group.chunks)
        multiplier, rescale = self._scales(group, absmax, norms, l1)
        # each output row: the quantized value where the tensor is finite, the input (bitwise) elsewhere
        out_rows = torch.where(ok, group.quantized_rows, group.rows).split(group.chunk_sizes)
        if residual is not None:
            # the new residual: p - Q(p) (computed in y) where quantized, the old one elsewhere
            n = group.num_blocks
            residual_rows = torch.where(ok, group.rows + n, group.rows + 2 * n).split(group.chunk_sizes)
        with_dither = self.rounding == "stochastic" and self.method != "sign"
        dithers = group.dither(step, keys, generator).split(group.chunk_sizes) if with_dither else None
        per_chunk = zip(group.chunks, bounds, multiplier.split(group.chunk_sizes), rescale.split(group.chunk_sizes))
        for c, (chunk, chunk_bound, chunk_multiplier, chunk_rescale) in enumerate(per_chunk):
            if chunk_bound is not None:
                self._clamp_chunk(chunk, chunk_bound)
            q = chunk.q
            if self.method == "sign":
                torch.sign(chunk.source, out=q).mul_(chunk_multiplier)
            else:
                if dithers is not None:
                    torch.addcmul(dithers[c], chunk.source, chunk_multiplier, out=q)
                else:
                    torch.mul(chunk.source, chunk_multiplier, out=q)
                q.round_().mul_(chunk_rescale)
            if group.dtype != q.dtype:
                q.copy_(q.to(group.dtype))  # the residual and the error refer to what the optimizer will see
            torch.index_select(group.work, 0, out_rows[c], out=chunk.out)
            torch._foreach_copy_(tensors[chunk.tensors], chunk.out_views)
            # p - Q(p), over the input's rows (no longer needed)
            torch.linalg.vector_norm(chunk.source.sub_(q), dim=1, out=chunk.stats[3])
            if chunk.residual is not None:
                torch.index_select(group.work, 0, residual_rows[c], out=chunk.out)
                chunk.residual.copy_(chunk.out)
        squares = torch.where(ok, torch.stack([error, norms]).square(), group.zero).sum(1)
        clamped = torch.where(ok, over, group.zero).sum() if bound is not None else group.zero
        return torch.cat([squares, clamped.view(1), (group.numel * ok_tensor).sum().view(1)])

    def _clamp_chunk(self, chunk: _Chunk, bound: Tensor) -> None:
        """Clamp the input of ``chunk`` to ``bound``; count what is clamped and take the norms again."""
        _clamp_(chunk.source, bound, scratch=chunk.out, over=chunk.stats[4])
        torch.linalg.vector_norm(chunk.source, dim=1, out=chunk.stats[2])
        if self.method == "sign":
            torch.linalg.vector_norm(chunk.source, 1, dim=1, out=chunk.stats[5])

    def _sample_index(
        self, group: _Group, step: int, keys: tuple[int, ...], generator: torch.Generator
    ) -> Optional[Tensor]:
        """For ``clamp_quantile``: ``(tensors, QUANTILE_SAMPLES)`` random positions in the buffer, each in its
        tensor (``None`` without ``clamp_quantile``)."""
        if self.clamp_quantile is None:
            return None
        count = group.numel.shape[0]
        generator.manual_seed(derive_seed(step, *keys))
        u = torch.rand(count, QUANTILE_SAMPLES, generator=generator, dtype=torch.float64, device=group.x.device)
        offsets = torch.minimum((u * group.numel.unsqueeze(1)).long(), group.last_offset.unsqueeze(1))
        # an empty tensor at the end of the buffer starts past its last element: its (unused) samples stay inside
        return (group.starts.unsqueeze(1) + offsets).clamp(max=group.numel_total - 1)

    def _outlier_bound(self, group: _Group, norms: Tensor, samples: Optional[Tensor]) -> Optional[Tensor]:
        """Per-tensor bound on ``|g|`` (or ``None`` when no outlier bound is configured); ``samples``: the values at
        the positions of :meth:`_sample_index`."""
        if self.clamp_sigma is not None:
            rms = (group.per_tensor(norms.square()) / group.numel.clamp(min=1)).sqrt()
            return self.clamp_sigma * rms
        if samples is None:
            return None
        samples = samples.abs_()
        k = max(1, math.ceil(self.clamp_quantile * QUANTILE_SAMPLES))
        if QUANTILE_SAMPLES - k < _TOPK_SAMPLES:  # a quantile near 1: a partial sort of the few largest is faster
            return samples.topk(QUANTILE_SAMPLES - k + 1, dim=1).values[:, -1]
        return samples.kthvalue(k, dim=1).values

    def _scales(self, group: _Group, absmax: Tensor, norms: Tensor, l1: Tensor) -> tuple[Tensor, Tensor]:
        """Per-block ``(multiplier, rescale)``, shape ``(num_blocks, 1)``: ``Q(p) = round(p * multiplier (+ dither))
        * rescale``; for ``"sign"``, ``Q(p) = sign(p) * multiplier`` (``rescale`` unused). Statistics of the input
        after the outlier bound."""
        if self.method == "sign":
            mean_abs = group.per_tensor(l1) / group.numel.clamp(min=1)
            multiplier = group.per_block(mean_abs).unsqueeze(1)
            return multiplier, multiplier  # rescale: unused
        if self.method == "stochastic":
            scale = absmax
        elif self.method == "qsgd":
            scale = norms
        else:  # terngrad: one scale per tensor, the largest element after clipping
            scale = group.per_block(group.per_tensor(absmax, "max"))
        # zero blocks quantize to zero with any scale; blocks that are not finite are not copied out
        scale = torch.where(scale > 0, scale, 1.0).unsqueeze(1)
        return self.levels / scale, scale / self.levels


def _clamp_(source: Tensor, bound: Tensor, scratch: Tensor, over: Tensor) -> None:
    """Clamp ``source`` to ``[-bound, bound]`` in place; write the number of elements clamped in each block to
    ``over``.

    ``minimum``/``maximum`` and a float count in a scratch buffer: ``clamp`` with tensor bounds and boolean sums
    are several times slower on the CPU.
    """
    torch.sum(torch.gt(torch.abs(source, out=scratch), bound, out=scratch), 1, out=over)
    torch.minimum(source, bound, out=source)
    torch.maximum(source, -bound, out=source)


def _spec(t: Tensor) -> Optional[tuple]:
    """What is needed to turn a local shard back into the full tensor (``None`` for a plain tensor)."""
    if DTensor is None or not isinstance(t, DTensor):
        return None
    return (t.device_mesh, tuple(t.placements), t.shape, t.stride())


def _full_tensor(local: Tensor, spec: Optional[tuple]) -> Tensor:
    if spec is None:
        return local.clone()
    mesh, placements, shape, stride = spec
    return DTensor.from_local(local, mesh, placements, shape=shape, stride=stride).full_tensor()


def _import_residuals(group: _Group, carried: dict[str, Tensor], pending: dict[str, Tensor]) -> None:
    """Fill a new group's residuals: local tensors carried from the previous layout, or full tensors loaded from a
    checkpoint (sliced to this rank's shard; a collective under FSDP2, taken by every rank at the same step)."""
    for name, view, spec in zip(group.names, group.residual_views, group.specs):
        if name in carried:
            value = carried[name]
        elif name in pending:
            value = pending[name].to(view.device)
            if spec is not None:
                mesh, placements, _, _ = spec
                value = distribute_tensor(value, mesh, list(placements)).to_local()
        else:
            continue
        if value.shape != view.shape:
            warnings.warn(
                f"GradientQuantizer: the saved residual of {name!r} has shape {tuple(value.shape)} but the gradient"
                f" has shape {tuple(view.shape)}; its error feedback restarts from zero."
            )
            continue
        view.copy_(value)


def quantize(tensor: Tensor, method: Method = "stochastic", *, step: int = 0, **options: Any) -> Tensor:
    """``Q(tensor)``, out of place, one step of a fresh :class:`GradientQuantizer` (no residual carried over).

    Args:
        tensor: the values to quantize.
        method: as in :class:`GradientQuantizer`.
        step: with ``seed`` (an option), determines the random draws.
        options: any other argument of :class:`GradientQuantizer` (``bits``, ``block_size``, ``rounding``, ...).

    Example::

        >>> import torch
        >>> quantize(torch.tensor([0.5, -1.0, 0.26, 0.0]), bits=2, rounding="nearest")
        tensor([ 0., -1.,  0.,  0.])
        >>> quantize(torch.tensor([0.5, -1.0, 0.26, 0.0]), bits=3, rounding="nearest")
        tensor([ 0.6667, -1.0000,  0.3333,  0.0000])
    """
    out = tensor.detach().clone()
    GradientQuantizer(method, **options).quantize_([out], step)
    return out
