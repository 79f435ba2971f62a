"""Host-synchronisation accounting: every device-to-host read lowers to ``_local_scalar_dense`` (``.item()``,
``if t:``), ``nonzero`` (``masked_select``, boolean-mask indexing) or a copy to the CPU; :class:`HostSyncCounter`
counts them in a block of code, so a test on the CPU proves the code would not stall a GPU."""

from __future__ import annotations

from collections import Counter
from typing import Any, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "host_read", "to_device"]

_aten = torch.ops.aten
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "_local_scalar_dense",
    _aten.nonzero.default: "nonzero",
    _aten.nonzero_static.default: "nonzero",
    _aten.masked_select.default: "nonzero",
}
_INDEX_PUT = (_aten.index_put, _aten.index_put_, _aten._index_put_impl_)
_BOOL_INDEX_OPS = {_aten.index.Tensor, *(f.default for f in _INDEX_PUT)}


def _is_boolean_index(func: Any, args: tuple) -> bool:
    """``t[mask]`` and ``t[mask] = v`` with a boolean mask: the output size needs a ``nonzero`` on the host."""
    if func not in _BOOL_INDEX_OPS or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


def _is_host_copy(func: Any, kwargs: dict) -> bool:
    if func is _aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu"
    return False


class HostSyncCounter(TorchDispatchMode):
    """Count host synchronisations (``_local_scalar_dense``, ``nonzero``, copies to the CPU) inside a block.

    Example::

        >>> import torch
        >>> with HostSyncCounter() as counter:
        ...     _ = torch.ones(3).sum().item()
        >>> counter.total
        1
        >>> dict(counter.counts)
        {'_local_scalar_dense': 1}
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _SYNC_OPS.get(func)
        if name is not None:
            self.counts[name] += 1
        elif _is_boolean_index(func, args):
            self.counts["nonzero"] += 1
        elif _is_host_copy(func, kwargs):
            self.counts["to_cpu"] += 1
        return func(*args, **kwargs)


def host_read(values: torch.Tensor) -> list:
    """The one deliberate device-to-host read of a flush: copy ``values`` to the CPU and return it as a list.

    The explicit copy (rather than ``.tolist()`` on the device tensor) makes the read visible to
    :class:`HostSyncCounter` on every device, the CPU included.
    """
    return values.to("cpu", copy=True).tolist()  # sync: the one deliberate host read, made by the flush


def to_device(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """``tensor`` on ``device``, copied without a host synchronisation.

    ``.to("cuda")`` of an ordinary (pageable) CPU tensor makes the host wait for the GPU's queue to drain (CUDA's
    sync-debug mode reports it as a synchronising call). A CPU tensor bound for a GPU therefore goes through pinned
    memory with a non-blocking copy; torch's pinned-memory pool keeps the staging buffer until the copy has run.
    Every other move is a plain ``.to``.
    """
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
