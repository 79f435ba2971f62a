"""Gradient norms as device tensors, without host synchronisation.

Per-tensor norms are computed with one ``torch._foreach_norm`` call per (device, dtype) group, in float32
whatever the gradient dtype, and gathered into one vector in input order. The global norm is the norm of that
vector. Sharded gradients (``DTensor`` under FSDP2) contribute their local shard; the partial results are reduced
across the shard's process group with one collective per group, so every rank sees the full-tensor norms.

Nothing here reads a value back to the host: no ``.item()``, no ``if tensor``, no ``nonzero``.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Callable, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from lightning_gradguard.utilities import device_tensor

__all__ = [
    "UnitNorms",
    "as_local_tensor",
    "grad_norms",
    "local_shards",
    "total_norm",
    "unit_norms",
    "unit_values",
    "validate_norm_type",
]

_NORM_DTYPE = torch.float32

Prepare = Callable[[list[Tensor]], None]
"""an in-place operation on tensors of one device and dtype, applied just before their norms are taken"""

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def validate_norm_type(norm_type: Union[float, int, str], name: str = "norm_type") -> float:
    """Return ``norm_type`` as a float, or raise a ``ValueError`` naming ``name``.

    Accepted: any real ``p >= 1``, ``inf`` (``float("inf")`` or the string ``"inf"``).
    """
    if isinstance(norm_type, str):
        if norm_type.lower() not in ("inf", "infinity"):
            raise ValueError(f"Expected `{name}` to be a number >= 1 or 'inf' but got {norm_type!r}")
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number >= 1 or 'inf' but got {type(norm_type).__name__}")
    p = float(norm_type)  # a Python number: no sync
    if math.isnan(p) or p < 1:
        raise ValueError(f"Expected `{name}` to be a number >= 1 or 'inf' but got {norm_type!r}")
    return p


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def as_local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor``; any other tensor unchanged (a view: in-place ops write through)."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_groups(t: Tensor) -> tuple:
    """Process groups over which a DTensor's local norms must be reduced (its sharded mesh dimensions)."""
    if not _is_dtensor(t):
        return ()
    mesh = t.device_mesh
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard() or placement.is_partial():
            groups.append(mesh.get_group(dim) if mesh.ndim > 1 else mesh.get_group())
    return tuple(groups)


_INDEX_CACHE: dict[tuple, Tensor] = {}


def _index_on(idx: Sequence[int], device: torch.device) -> Tensor:
    """``idx`` as a long tensor on ``device``, made once per (indices, device): a model's grouping of tensors does not
    change between steps, and a fresh host-to-device copy every step would make a GPU's host wait."""
    key = (tuple(idx), torch.device(device))
    index = _INDEX_CACHE.get(key)
    if index is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        index = _INDEX_CACHE[key] = device_tensor(key[0], dtype=torch.long, device=device)
    return index


def _local_norms(
    tensors: Sequence[Tensor], p: float, out_device: torch.device, prepare: Optional[Prepare] = None
) -> Tensor:
    """Float32 vector of the norms of plain local tensors, one foreach call per (device, dtype) group (grouped in
    C++, as ``clip_grad_norm_`` does: a Python loop over the tensors costs more than the norms of small ones).

    ``prepare``: an in-place operation (e.g. a clamp) applied to the tensors of one (device, dtype) group just before
    their norms are taken, so the norms are those of the result; on the CPU a large tensor gets it right before its
    own norm, while it is still in cache."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    if len(grouped) == 1:
        ((group, _),) = grouped.values()
        return _foreach_norm_fp32(group[0], p, prepare).to(out_device, non_blocking=True)
    out = torch.empty(len(tensors), dtype=_NORM_DTYPE, device=out_device)
    for (group, idx) in grouped.values():
        norms = _foreach_norm_fp32(group[0], p, prepare)
        index = _index_on(idx, out_device)
        out.index_copy_(0, index, norms.to(out_device, non_blocking=True))
    return out


# On the CPU torch's foreach norm is a loop of one reduction per tensor, whose fixed cost (microseconds) outweighs
# the arithmetic of a small tensor (a bias, a norm layer's weight). Small tensors of one size are stacked and reduced
# in one call instead; larger ones stay separate, where a stacked copy would cost more than the call it saves.
_STACK_NUMEL = 16384
# A reduction of a whole large tensor to one number spreads poorly over CPU threads (measured: 1.4 ms for 4M floats on
# two threads, where its row norms take 0.43 ms and a single thread 1.5 ms either way). A large tensor with rows is
# reduced row by row, then the row norms are reduced: the p-norm of the rows' p-norms is the tensor's p-norm.
_ROWS_NUMEL = 1 << 18
# weights up to this size, three or more of one shape, are stacked for their row norms on the CPU too (see
# `_unit_plan`): for them the copy costs less than a call per tensor; for larger ones (measured at 16384) it costs more
_ROW_STACK_NUMEL = 4096

# On an accelerator every kernel launch costs host time (about 10 us each on an H200) whatever its size, so a step
# over many small tensors is bound by the number of launches, not by memory. There, tensors of one shape are batched:
# stacked into one copy (one launch, cheap next to the launches it saves) and reduced or scaled in one call. Only
# tensors up to `_BATCH_NUMEL` elements, at least `_BATCH_MIN` of a shape, in copies of at most `_BATCH_CHUNK`
# elements (64 MB in float32), so the temporary stays small beside the gradients; a larger tensor keeps its own
# launch, which its memory traffic outweighs. On the CPU a copy of a large tensor is a pass over memory that costs
# more than the call it saves: there only small tensors are stacked (`_CpuPlan`, `_ROW_STACK_NUMEL`).
_BATCH_NUMEL = 1 << 20
_BATCH_CHUNK = 1 << 24
_BATCH_MIN = 3
_BATCH_ON_CPU = False  # tests set it to run the accelerator layout on the CPU


def batching_on(device: torch.device) -> bool:
    """Whether tensors on ``device`` are batched by shape (see `_BATCH_NUMEL`): on an accelerator."""
    return torch.device(device).type != "cpu" or _BATCH_ON_CPU


def batches_by_shape(
    device: torch.device, shapes: Sequence[torch.Size], candidates: Iterable[int], cpu_numel: int = 0
) -> list[list[int]]:
    """The batches of `candidates` (indices into ``shapes``) that an accelerator handles together: tensors of one
    shape, in chunks (see `_BATCH_NUMEL`). On the CPU only tensors up to ``cpu_numel`` elements (none by default),
    small enough that their stacked copy costs less than the calls it saves."""
    limit = _BATCH_NUMEL if batching_on(device) else cpu_numel
    return _same_shape_groups(shapes, candidates, limit, _BATCH_MIN, _BATCH_CHUNK) if limit else []


def _same_shape_groups(
    shapes: Sequence[torch.Size], candidates: Iterable[int], max_numel: int, min_count: int, chunk: int = 0
) -> list[list[int]]:
    """`candidates` (indices into ``shapes``) of up to ``max_numel`` elements grouped by shape, each group of at least
    ``min_count`` tensors and, with ``chunk``, of at most ``chunk`` elements in all."""
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i in candidates:
        if 0 < math.prod(shapes[i]) <= max_numel:
            by_shape[shapes[i]].append(i)
    out = []
    for shape, idx in by_shape.items():
        per = max(1, chunk // math.prod(shape)) if chunk else len(idx)
        out += [idx[j : j + per] for j in range(0, len(idx), per) if len(idx[j : j + per]) >= min_count]
    return out


def _foreach_norm_fp32(tensors: list[Tensor], p: float, prepare: Optional[Prepare] = None) -> Tensor:
    if tensors[0].device.type == "cpu":
        return _cpu_norms(tensors, p, prepare)
    if prepare is not None:  # on an accelerator the foreach kernels are fused: the whole group at once
        prepare(tensors)
    return _plain_foreach_norm(tensors, p)


class _CpuPlan(NamedTuple):
    """How the norms of one CPU (device, dtype) group are taken."""

    stacks: list[list[int]]
    """small tensors of one shape, each list reduced as one stack"""
    whole: list[int]
    """tensors reduced whole (one foreach call, or one by one after ``prepare``)"""
    rows: list[tuple[int, tuple[int, ...]]]
    """large tensors with rows, and the dimensions their rows reduce over"""
    order: Optional[Tensor]
    """where each tensor's norm sits among the stacks', the whole tensors' and the rows' (in that order), or
    ``None`` when that is the input order"""


_CPU_PLANS: dict[tuple, _CpuPlan] = {}


def _cpu_plan(shapes: tuple[torch.Size, ...]) -> _CpuPlan:
    """The plan for tensors of these shapes; cached, as shapes do not change between steps and grouping them in
    Python every step would cost more than it saves."""
    plan = _CPU_PLANS.get(shapes)
    if plan is not None:
        return plan
    if len(_CPU_PLANS) > 64:
        _CPU_PLANS.clear()
    stacks = _same_shape_groups(shapes, range(len(shapes)), _STACK_NUMEL, 2)
    stacked = {i for idx in stacks for i in idx}
    rows = [
        (i, tuple(range(1, len(shape))))
        for i, shape in enumerate(shapes)
        if i not in stacked and len(shape) > 1 and shape[0] > 1 and math.prod(shape) >= _ROWS_NUMEL
    ]
    in_rows = {i for i, _ in rows}
    whole = [i for i in range(len(shapes)) if i not in stacked and i not in in_rows]
    order = [i for idx in stacks for i in idx] + whole + [i for i, _ in rows]
    position = [0] * len(order)
    for where, i in enumerate(order):
        position[i] = where
    in_order = position == list(range(len(position)))
    plan = _CPU_PLANS[shapes] = _CpuPlan(stacks, whole, rows, None if in_order else torch.tensor(position))
    return plan


def _cpu_norms(
    tensors: list[Tensor], p: float, prepare: Optional[Prepare] = None, plan: Optional[_CpuPlan] = None
) -> Tensor:
    """Norms of one CPU (device, dtype) group (see `_CpuPlan`; ``plan``: when the caller has it for these shapes).
    With ``prepare``, each tensor not in a stack gets it right before its own norm, so the norm reads what
    ``prepare`` just wrote from cache."""
    if plan is None:
        plan = _cpu_plan(tuple([t.shape for t in tensors]))
    dtype = None if tensors[0].dtype == torch.float64 else _NORM_DTYPE  # float64 keeps its precision through the norm
    parts = []
    for idx in plan.stacks:
        members = [tensors[i] for i in idx]
        if prepare is not None:
            prepare(members)
        parts.append(torch.linalg.vector_norm(torch.stack(members).view(len(idx), -1), p, dim=1, dtype=dtype))
    if plan.whole:
        whole = [tensors[i] for i in plan.whole]
        if prepare is None:
            parts.append(_plain_foreach_norm(whole, p))
        else:
            norms = []
            for t in whole:
                prepare([t])
                norms.append(torch.linalg.vector_norm(t, p, dtype=dtype))
            parts.append(torch.stack(norms))
    if plan.rows:
        norms = []
        for i, dims in plan.rows:
            if prepare is not None:
                prepare([tensors[i]])
            norms.append(torch.linalg.vector_norm(torch.linalg.vector_norm(tensors[i], p, dim=dims, dtype=dtype), p))
        parts.append(torch.stack(norms))
    norms = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(_NORM_DTYPE)
    return norms if plan.order is None else norms.index_select(0, plan.order)


def _plain_foreach_norm(tensors: list[Tensor], p: float) -> Tensor:
    if tensors[0].dtype in (torch.float64,):
        # keep double precision through the norm, report float32 like every other dtype
        return torch.stack(torch._foreach_norm(tensors, p)).to(_NORM_DTYPE)
    try:
        norms = torch._foreach_norm(tensors, p, dtype=_NORM_DTYPE)
    except TypeError:  # pragma: no cover - torch < 2.3 has no dtype argument
        norms = torch._foreach_norm([t.float() for t in tensors], p)
    return torch.stack(norms)


def grad_norms(
    tensors: Iterable[Optional[Tensor]],
    norm_type: Union[float, int, str] = 2.0,
    *,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor]:
    """Per-tensor norms and the global norm of a list of tensors (usually gradients), as device tensors.

    Args:
        tensors: gradients (or any tensors). ``None`` entries are skipped: the returned vector has one entry per
            tensor that is not ``None``, in input order. ``DTensor`` entries contribute their local shard and are
            reduced over their sharded mesh dimensions, so the result is the full-tensor norm on every rank.
        norm_type: ``p`` of the p-norm, any ``p >= 1`` or ``inf``.
        device: where the result lives; defaults to the device of the first tensor.

    Returns:
        ``(per_tensor, total)``: a float32 vector of per-tensor norms and a float32 scalar, the norm of all
        tensors together. Both are zero-sized / zero for an empty input.

    Example::

        >>> import torch
        >>> per_tensor, total = grad_norms([torch.ones(3), torch.ones(2, 2)])
        >>> per_tensor
        tensor([1.7321, 2.0000])
        >>> total
        tensor(2.6458)
    """
    p = validate_norm_type(norm_type)
    items = [t for t in tensors if t is not None]
    if not items:
        dev = device if device is not None else torch.device("cpu")
        return torch.zeros(0, dtype=_NORM_DTYPE, device=dev), torch.zeros((), dtype=_NORM_DTYPE, device=dev)
    return _norms_of(items, local_shards(items), p, device)


def local_shards(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`as_local_tensor` of every tensor, in one pass (the per-step path calls it on every gradient)."""
    if DTensor is None:  # pragma: no cover - torch builds without distributed support
        return list(tensors)
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _norms_of(
    items: Sequence[Tensor],
    local: Sequence[Tensor],
    p: float,
    device: Optional[torch.device],
    prepare: Optional[Prepare] = None,
) -> tuple:
    """:func:`grad_norms` of ``items`` whose local shards ``local`` are already at hand (after ``prepare``, an
    in-place operation on them: see :func:`_local_norms`)."""
    norms = _local_norms(local, p, device if device is not None else local[0].device, prepare)
    if any(a is not b for a, b in zip(local, items)):  # some DTensor: its local norm is partial
        norms = _reduce_sharded(items, norms, p)
    return norms, _norm_of_norms(norms, p)


def _reduce_sharded(items: Sequence[Tensor], norms: Tensor, p: float) -> Tensor:
    """Turn local-shard norms into full-tensor norms: one all-reduce per distinct set of process groups."""
    import torch.distributed as dist

    by_groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(items):
        groups = _shard_groups(t)
        if groups:
            by_groups[groups].append(i)
    if not by_groups:
        return norms
    if math.isinf(p):
        reduced = norms.clone()
        for groups, idx in by_groups.items():
            index = _index_on(idx, norms.device)
            part = reduced.index_select(0, index)
            for group in groups:
                dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
            reduced.index_copy_(0, index, part)
        return reduced
    powered = norms.pow(p)
    for groups, idx in by_groups.items():
        index = _index_on(idx, norms.device)
        part = powered.index_select(0, index)
        for group in groups:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        powered.index_copy_(0, index, part)
    return powered.pow(1.0 / p)


def _norm_of_norms(norms: Tensor, p: float) -> Tensor:
    return torch.linalg.vector_norm(norms, p)


def total_norm(tensors: Iterable[Optional[Tensor]], norm_type: Union[float, int, str] = 2.0) -> Tensor:
    """The global norm of ``tensors`` as a float32 device tensor (see :func:`grad_norms`)."""
    return grad_norms(tensors, norm_type)[1]


class UnitNorms(NamedTuple):
    """L2 norms of the units of a list of tensors, and the per-tensor and global norms they add up to (float32)."""

    units: Tensor
    """one norm per unit, tensor after tensor: the rows (dim 0) of a tensor with two or more dimensions (of its
    local shard under FSDP2, which shards on dim 0, so the rows are whole), the whole tensor otherwise"""
    per_tensor: Tensor
    """full-tensor norms, as :func:`grad_norms` returns them"""
    total: Tensor
    """the global norm"""
    counts: list[int]
    """units per tensor"""


class _UnitPlan(NamedTuple):
    """How one step's unit norms are computed for tensors of given local shapes on a device (cached: a model's shapes
    do not change between steps). Units are laid out in input order: each tensor's units in one span."""

    rows: list[tuple[int, tuple[int, ...]]]
    """per tensor with rows: its index and the dimensions its rows reduce over"""
    rows_alone: list[tuple[int, tuple[int, ...]]]
    """the entries of ``rows`` not in ``row_batches``, reduced one by one"""
    row_batches: list[tuple[list[int], Tensor, tuple[int, ...]]]
    """tensors with rows of one shape reduced as one stack (`batches_by_shape`: on an accelerator, and small weights
    on the CPU): their indices, where their units sit (a device index) and the dimensions the stack's rows reduce
    over"""
    whole: list[int]
    """tensors that are one unit each, reduced together"""
    whole_index: Optional[Tensor]
    """where the units of the whole tensors sit (a device index), or ``None`` when there are none"""
    size: int
    """units in all"""
    counts: list[int]
    """units per tensor, in input order"""
    has_rows: list[bool]
    segments: Segments
    """each tensor's units as a segment of the unit vector"""
    whole_plan: Optional[_CpuPlan]
    """on the CPU, the `_CpuPlan` of the whole tensors (made with the plan, not looked up every step)"""
    direct: list[bool]
    """one flag: whether `_whole_norms` may take the whole tensors straight through ``whole_plan`` (cleared the first
    time a dtype or device mix makes that path raise, so the mix costs one exception, not one per step)"""


_PLAN_CACHE: dict[tuple, _UnitPlan] = {}


def _unit_plan(shapes: tuple[torch.Size, ...], device: torch.device) -> _UnitPlan:
    key = (shapes, device)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) > 64:
            _PLAN_CACHE.clear()
        # built from Python ints (no device value is read), then copied to the device once
        counts = [s[0] if len(s) > 1 else 1 for s in shapes]
        has_rows = [len(s) > 1 for s in shapes]
        starts = [0, *itertools.accumulate(counts)][:-1]
        rows = [(i, tuple(range(1, len(s)))) for i, s in enumerate(shapes) if has_rows[i]]
        whole = [i for i in range(len(shapes)) if not has_rows[i]]
        # small weights of one shape are stacked for their row norms on the CPU too, as `_CpuPlan` stacks small
        # whole tensors: a call per tensor costs more there than the copy
        batches = batches_by_shape(device, shapes, [i for i, _ in rows], cpu_numel=_ROW_STACK_NUMEL)
        row_batches = [
            (
                idx,
                device_tensor([starts[i] + j for i in idx for j in range(counts[i])], dtype=torch.long, device=device),
                tuple(range(2, len(shapes[idx[0]]) + 1)),
            )
            for idx in batches
        ]
        batched = {i for idx in batches for i in idx}
        plan = _PLAN_CACHE[key] = _UnitPlan(
            rows,
            [(i, dims) for i, dims in rows if i not in batched],
            row_batches,
            whole,
            device_tensor([starts[i] for i in whole], dtype=torch.long, device=device) if whole else None,
            sum(counts),
            counts,
            has_rows,
            Segments(counts, device),
            _cpu_plan(tuple(shapes[i] for i in whole)) if whole and torch.device(device).type == "cpu" else None,
            [True],
        )
    return plan


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


def unit_norms(tensors: Sequence[Tensor], *, device: Optional[torch.device] = None) -> UnitNorms:
    """Unit-wise L2 norms (what AGC needs) and, from the same single pass over the data, the per-tensor and global
    norms, so a step that needs both reads its gradients once.

    A unit is a row (an output unit of a ``Linear`` or ``ConvNd`` weight) of a tensor with two or more dimensions, or
    a whole tensor with fewer (a bias, a scalar): one ``vector_norm`` over the trailing dimensions per tensor with
    rows, one ``foreach`` norm for the others. ``DTensor`` entries contribute their local shard; the per-tensor norms
    are reduced over the shards as in :func:`grad_norms`, and so are the units that are whole tensors. No host read.

    Example::

        >>> import torch
        >>> result = unit_norms([torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([1.0, 1.0])])
        >>> result.units
        tensor([5.0000, 1.0000, 1.4142])
        >>> result.per_tensor
        tensor([5.0990, 1.4142])
        >>> result.counts
        [2, 1]
    """
    items = list(tensors)
    if not items:
        dev = device if device is not None else torch.device("cpu")
        empty = torch.zeros(0, dtype=_NORM_DTYPE, device=dev)
        return UnitNorms(empty, empty, torch.zeros((), dtype=_NORM_DTYPE, device=dev), [])
    return _unit_norms_of(items, local_shards(items), device)


def _unit_norms_of(
    items: Sequence[Tensor],
    local: Sequence[Tensor],
    device: Optional[torch.device],
    buffers: Optional[dict[tuple, _UnitBuffer]] = None,
) -> UnitNorms:
    """:func:`unit_norms` of ``items`` whose local shards ``local`` are already at hand (``buffers``: see `_units`)."""
    units, counts, has_rows, segments = _units(items, local, device if device is not None else local[0].device, buffers)
    per_tensor = segments.sum(units.square()).sqrt()
    if any(a is not b and rows for a, b, rows in zip(local, items, has_rows)):
        # the rows of a sharded tensor are local to its shard: its norm adds up over the shards (the units that are
        # whole tensors are full-tensor norms already, so they are passed as plain tensors and left alone)
        per_tensor = _reduce_sharded([t if rows else a for t, a, rows in zip(items, local, has_rows)], per_tensor, 2.0)
    return UnitNorms(units, per_tensor, _norm_of_norms(per_tensor, 2.0), counts)


def unit_values(tensors: Sequence[Tensor], *, device: Optional[torch.device] = None) -> Tensor:
    """Only the ``units`` of :func:`unit_norms` (e.g. AGC's weight norms): no per-tensor or global norm."""
    items = list(tensors)
    if not items:
        return torch.zeros(0, dtype=_NORM_DTYPE, device=device if device is not None else torch.device("cpu"))
    local = local_shards(items)
    return _units(items, local, device if device is not None else local[0].device)[0]


def _whole_norms(tensors: list[Tensor], plan: _UnitPlan, out_device: torch.device) -> Tensor:
    """L2 norms of the whole tensors of a unit plan. On the CPU straight through the plan's `_CpuPlan`: grouping by
    dtype and looking the plan up again took about as long as the stacked reduction itself on a cold cache (biases
    and norm weights are many small objects). A mix the direct path cannot take (a float64 tensor behind float32
    ones, a tensor on another device) raises there once; from then on this plan's tensors go through the grouped
    path (a model's dtypes and devices stay as they are between steps, and the grouped path is right for any)."""
    if plan.direct[0] and plan.whole_plan is not None and tensors[0].device == out_device:
        try:
            return _cpu_norms(tensors, 2.0, plan=plan.whole_plan)
        except (RuntimeError, TypeError):
            plan.direct[0] = False
    return _local_norms(tensors, 2.0, out_device)


def _row_norms(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Float32 L2 norms of the rows of ``t`` (float64 reduced in its own precision first)."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, dim=dims).to(_NORM_DTYPE)
    return torch.linalg.vector_norm(t, dim=dims, dtype=_NORM_DTYPE)


class _UnitBuffer:
    """A float32 buffer for the unit norms of one plan, reused step after step, the span of every tensor with rows
    made once. For the per-step path, whose units are used within the step and overwritten by the next one (the
    public functions return fresh tensors)."""

    def __init__(self, plan: _UnitPlan, device: torch.device) -> None:
        self.tensor = torch.empty(plan.size, dtype=_NORM_DTYPE, device=device)
        spans = self.tensor.split(plan.counts)
        self.spans = [spans[i] for i, _ in plan.rows_alone]


def _units(
    items: Sequence[Tensor],
    local: Sequence[Tensor],
    out_device: torch.device,
    buffers: Optional[dict[tuple, _UnitBuffer]] = None,
) -> tuple[Tensor, list[int], list[bool], Segments]:
    """Unit norms in input order (whole-tensor units reduced over shards), units per tensor, which tensors have
    rows, and each tensor's units as a segment. ``buffers``: the caller's reusable buffers (see `_UnitBuffer`)."""
    shapes = tuple([t.shape for t in local])
    plan = _unit_plan(shapes, out_device)
    whole = None
    if plan.whole:  # tensors that are one unit each: reduced together
        whole = _whole_norms([local[i] for i in plan.whole], plan, out_device)
        if any(local[i] is not items[i] for i in plan.whole):  # a whole sharded tensor is one unit: its full norm
            whole = _reduce_sharded([items[i] for i in plan.whole], whole, 2.0)
    if torch.is_grad_enabled() and any(t.requires_grad for t in local):
        # differentiable (e.g. parameters outside no_grad): `out=` records no autograd history, so concatenate
        by_tensor: list[Optional[Tensor]] = [None] * len(local)
        for i, dims in plan.rows:
            by_tensor[i] = _row_norms(local[i], dims).to(out_device)
        if whole is not None:
            for i, norm in zip(plan.whole, whole.split(1)):
                by_tensor[i] = norm
        return torch.cat(by_tensor), plan.counts, plan.has_rows, plan.segments  # type: ignore[arg-type]
    # rows: one reduction over the trailing dimensions per tensor, written straight into its span of one buffer
    if buffers is not None:
        buffer = buffers.get((shapes, out_device))
        if buffer is None:
            if len(buffers) > 8:
                buffers.clear()
            buffer = buffers[(shapes, out_device)] = _UnitBuffer(plan, out_device)
        units, spans = buffer.tensor, buffer.spans
    else:
        units = torch.empty(plan.size, dtype=_NORM_DTYPE, device=out_device)
        pieces = units.split(plan.counts)  # one call makes every tensor's span
        spans = [pieces[i] for i, _ in plan.rows_alone]
    for members, index, dims in plan.row_batches:  # one stack, one reduction, one copy per batch
        stack = torch.stack([local[i] for i in members])
        units.index_copy_(0, index, _row_norms(stack, dims).view(-1).to(out_device))
    for (i, dims), span in zip(plan.rows_alone, spans):
        t = local[i]
        if t.dtype is not torch.float64:  # float64 is reduced in its own precision first (`_row_norms`)
            try:
                torch.linalg.vector_norm(t, dim=dims, dtype=_NORM_DTYPE, out=span)
                continue
            except RuntimeError:  # on another device than the output
                pass
        span.copy_(_row_norms(t, dims), non_blocking=True)
    if whole is not None:
        units.index_copy_(0, plan.whole_index, whole)
    return units, plan.counts, plan.has_rows, plan.segments
