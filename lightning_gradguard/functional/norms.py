"""Gradient norms as device tensors, without host synchronisation.

The pattern of ``clip_grad_norm_``: tensors grouped by device and dtype, one ``torch._foreach_norm`` per group, in
float32 (float64 keeps its precision), the global norm as the norm of the per-tensor norms. ``DTensor`` shards (FSDP2)
are reduced over their process groups, so every rank sees full-tensor norms. :func:`unit_norms` adds the norms of the
rows of each weight (AGC's units).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "StepGradients", "UnitNorms", "as_local_tensor", "full_tensor_norms", "grad_norms", "local_shards", "total_norm",
    "unit_norms", "units_of", "validate_norm_type",
]

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def validate_norm_type(norm_type: Union[float, int, str], name: str = "norm_type") -> float:
    """Return ``norm_type`` as a float, or raise naming ``name``: any real ``p >= 1``, or ``inf`` (also ``"inf"``)."""
    if isinstance(norm_type, str):
        if norm_type.lower() not in ("inf", "infinity"):
            raise ValueError(f"Expected `{name}` to be a number >= 1 or 'inf' but got {norm_type!r}")
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number >= 1 or 'inf' but got {type(norm_type).__name__}")
    if math.isnan(norm_type) or norm_type < 1:
        raise ValueError(f"Expected `{name}` to be a number >= 1 or 'inf' but got {norm_type!r}")
    return float(norm_type)  # a Python number: no device value, no sync


def as_local_tensor(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view: in-place operations write through); any other tensor unchanged."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def local_shards(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`as_local_tensor` of every tensor."""
    return [as_local_tensor(t) for t in tensors]


def _local_norms(tensors: Sequence[Tensor], p: float, device: torch.device) -> Tensor:
    """Float32 vector of the p-norms of plain tensors, in input order: one foreach call per (device, dtype)."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    parts = {}
    for (_, dtype), ([group], indices) in grouped.items():  # type: ignore[misc]
        norm_dtype = None if dtype == torch.float64 else torch.float32
        parts[tuple(indices)] = torch.stack(torch._foreach_norm(group, p, dtype=norm_dtype)).to(device).float()
    if len(parts) == 1:  # one device and dtype: already in input order
        return next(iter(parts.values()))
    # gathered in input order by one stack: an index tensor made each step would be a host-to-device copy
    norms: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for indices, values in parts.items():
        for i, value in zip(indices, values.unbind()):
            norms[i] = value
    return torch.stack(norms)


def full_tensor_norms(items: Sequence[Optional[Tensor]], norms: Tensor, p: float = 2.0) -> Tensor:
    """The p-norms ``norms`` of the local shards of ``items`` turned into full-tensor norms: one all-reduce per
    distinct set of process groups over which some ``DTensor`` is sharded (or partial). The norms of plain tensors
    and of ``None`` entries (norms that are complete already) are returned as they are."""
    by_groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(items):  # ``None``: a tensor whose norm is complete already
        if DTensor is not None and isinstance(t, DTensor):
            mesh = t.device_mesh
            groups = tuple(
                mesh.get_group(dim) if mesh.ndim > 1 else mesh.get_group()
                for dim, placement in enumerate(t.placements)
                if placement.is_shard() or placement.is_partial()
            )
            if groups:
                by_groups[groups].append(i)
    if not by_groups:
        return norms
    import torch.distributed as dist

    op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
    values = list((norms if math.isinf(p) else norms.pow(p)).unbind())
    for groups, indices in by_groups.items():
        part = torch.stack([values[i] for i in indices])
        for group in groups:
            dist.all_reduce(part, op=op, group=group)
        for i, value in zip(indices, part.unbind()):
            values[i] = value
    reduced = torch.stack(values)
    return reduced if math.isinf(p) else reduced.pow(1.0 / p)


def grad_norms(
    tensors: Iterable[Optional[Tensor]], norm_type: float | int | str = 2.0, *, device: Optional[torch.device] = None
) -> tuple[Tensor, Tensor]:
    """Per-tensor norms and the global norm of a list of tensors (usually gradients), as float32 device tensors.

    Args:
        tensors: gradients (or any tensors); ``None`` entries are skipped. ``DTensor`` entries give full-tensor norms
            on every rank.
        norm_type: ``p`` of the p-norm, any ``p >= 1`` or ``inf``.
        device: where the result lives; defaults to the device of the first tensor.

    Returns:
        ``(per_tensor, total)``: one norm per tensor that is not ``None``, in input order, and the norm of all of
        them together. Empty input gives an empty vector and zero.

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
        device = device or torch.device("cpu")
        return torch.zeros(0, device=device), torch.zeros((), device=device)
    local = local_shards(items)
    norms = full_tensor_norms(items, _local_norms(local, p, device or local[0].device), p)
    return norms, torch.linalg.vector_norm(norms, p)


def total_norm(tensors: Iterable[Optional[Tensor]], norm_type: Union[float, int, str] = 2.0) -> Tensor:
    """The global norm of ``tensors`` as a float32 device tensor (see :func:`grad_norms`)."""
    return grad_norms(tensors, norm_type)[1]


class UnitNorms(NamedTuple):
    """L2 norms of the units of a list of tensors (float32), with the per-tensor and global norms they add up to."""

    units: Tensor
    """one norm per unit, tensor after tensor: the rows (dim 0) of a tensor with two or more dimensions (of its local
    shard under FSDP2, which shards on dim 0, so its rows are whole), the whole tensor otherwise"""
    per_tensor: Tensor
    """full-tensor norms, as :func:`grad_norms` returns them"""
    total: Tensor
    """the global norm"""
    counts: list[int]
    """units per tensor"""


def unit_norms(tensors: Sequence[Tensor], *, device: Optional[torch.device] = None) -> UnitNorms:
    """Unit-wise L2 norms (what AGC needs) and the per-tensor and global norms, from one read of the tensors.

    A unit is a row (an output unit of a ``Linear`` or ``ConvNd`` weight) of a tensor with two or more dimensions,
    or a whole tensor with fewer (a bias, a scalar). The norm of a tensor is the norm of its units' norms.

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
    return _unit_norms(list(tensors), device)[0]


def _unit_norms(items: list[Tensor], device: Optional[torch.device]) -> tuple[UnitNorms, Tensor]:
    """:func:`unit_norms`, and whether this rank's own (local) tensors were finite."""
    device = device or (items[0].device if items else torch.device("cpu"))
    if not items:
        zero = torch.zeros((), device=device)
        return UnitNorms(torch.zeros(0, device=device), torch.zeros(0, device=device), zero, []), zero < 1
    units, local_units = units_of(items, device)
    # a tensor's norm is the norm of its units' norms, local to the shard under FSDP2 until reduced
    local_norms = torch.stack(torch._foreach_norm(local_units, 2.0))
    per_tensor = full_tensor_norms(items, local_norms)
    counts = [piece.numel() for piece in local_units]
    return UnitNorms(units, per_tensor, torch.linalg.vector_norm(per_tensor), counts), torch.isfinite(local_norms.sum())


def units_of(items: Sequence[Tensor], device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """:attr:`UnitNorms.units` of non-empty ``items`` and, per tensor, the norms of its units local to its shard."""
    local = local_shards(items)
    whole = [i for i, t in enumerate(local) if t.ndim <= 1]
    local_whole = _local_norms([local[i] for i in whole], 2.0, device) if whole else None
    pieces = dict(zip(whole, local_whole.split(1))) if whole else {}
    for i, t in enumerate(local):  # float64 is reduced in its own precision; every other dtype in float32
        if t.ndim > 1:
            dtype = None if t.dtype == torch.float64 else torch.float32
            pieces[i] = torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), dtype=dtype).to(device).float()
    local_units = [pieces[i] for i in range(len(items))]
    full_whole = full_tensor_norms([items[i] for i in whole], local_whole) if whole else None
    if full_whole is local_whole:
        return torch.cat(local_units), local_units
    pieces.update(zip(whole, full_whole.split(1)))  # sharded under FSDP2: a whole-tensor unit is its full norm
    return torch.cat([pieces[i] for i in range(len(items))]), local_units


class StepGradients:
    """The gradients of one optimizer step and their L2 norms, computed once and shared by everything that reads
    them in that step (the callbacks' pipeline, :meth:`GradientClipper.clip_`).

    Args:
        params: the parameters; those without a gradient are left out.
        names: one name per parameter (default ``param_<i>``).
        with_units: also compute the row norms (``units``) in the same read of the gradients (AGC).
        optimizer: the optimizer about to step with these gradients, for rules that read its learning rates.

    Attributes:
        params: the parameters that have a gradient.
        names: their names.
        grads: their gradients (``DTensor`` under FSDP2).
        local_grads: the local shards of ``grads`` (views: in-place operations write through).
        per_tensor: full-tensor L2 norms before anything changed the gradients (float32).
        total: the global L2 norm before anything changed the gradients (float32).
        units: :attr:`UnitNorms.units` when asked for, else ``None``.
        finite: device bool, whether ``total`` is finite.
        local_finite: device bool, whether this rank's own gradients (its shards under FSDP2) were finite before
            the norms were reduced over ranks: a fault seen on one rank only names that rank.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        names: Optional[Sequence[str]] = None,
        *,
        with_units: bool = False,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> None:
        self.optimizer = optimizer
        params = list(params)
        names = [f"param_{i}" for i in range(len(params))] if names is None else list(names)
        if len(names) != len(params):
            raise ValueError(f"Expected one name per parameter ({len(params)}) but got {len(names)}")
        kept = [i for i, p in enumerate(params) if p.grad is not None]
        self.params: list[Tensor] = [params[i] for i in kept]
        self.names: list[str] = [names[i] for i in kept]
        self.grads: list[Tensor] = [p.grad for p in self.params]  # type: ignore[misc]
        self.local_grads = local_shards(self.grads)
        self.units: Optional[Tensor] = None
        with torch.no_grad():  # statistics of the gradients, never part of a graph
            if with_units:
                result, self.local_finite = _unit_norms(self.grads, None)
                self.units, self.per_tensor, self.total = result.units, result.per_tensor, result.total
            elif self.grads:
                local = _local_norms(self.local_grads, 2.0, self.local_grads[0].device)
                self.local_finite = torch.isfinite(local.sum())
                self.per_tensor = full_tensor_norms(self.grads, local)
                self.total = torch.linalg.vector_norm(self.per_tensor)
            else:
                self.per_tensor, self.total = grad_norms([])
                self.local_finite = torch.isfinite(self.total)
        self.finite: Tensor = torch.isfinite(self.total)

    @property
    def device(self) -> torch.device:
        return self.total.device
