"""One sync-counting helper: a subclass of any gradguard callback that counts host reads in its hooks."""

from __future__ import annotations

from collections import defaultdict

from lightning_gradguard import HostSyncCounter

_HOOKS = {"step": "on_before_optimizer_step", "backward": "on_before_backward", "batch_end": "on_train_batch_end"}


def counting(cls: type) -> type:
    """``cls`` with ``syncs[kind]``: host reads per call of the per-step hook (``"step"``, where the first gradguard
    callback in the list runs the whole pipeline), the loss hook (``"backward"``) and the flush hook
    (``"batch_end"``)."""

    def wrap(kind: str, hook: str):
        def method(self, *args, **kwargs):
            with HostSyncCounter() as counter:
                getattr(super(counted, self), hook)(*args, **kwargs)
            self.syncs[kind].append(counter.total)

        return method

    def init(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        self.syncs = defaultdict(list)

    namespace = {"__init__": init, **{hook: wrap(kind, hook) for kind, hook in _HOOKS.items()}}
    counted = type(f"Counting{cls.__name__}", (cls,), namespace)
    return counted
