"""One optimizer step of a gradguard callback's real work, outside a Trainer, for the per-step benchmarks.

The step is what ``Runtime.run`` does in training: gather the gradients and compute their norms once
(``GradStep``, with row norms when the callback asks for them), the callback's ``process_step``, values into the
deferred buffer; every ``flush_every`` calls the runtime's flush (one host read, the callbacks' ``on_flush``). The
few Trainer attributes that path reads are given by a stand-in (one process, no AMP, no logger).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Optional

import torch

from lightning_gradguard.callbacks._runtime import GradStep, Runtime
from lightning_gradguard.callbacks.base import GradGuardCallback


def pipeline_case(
    callback: GradGuardCallback,
    params: list[torch.nn.Parameter],
    names: Optional[list[str]] = None,
    *,
    flush_every: int = 50,
    warm_calls: int = 0,
) -> Callable[[], None]:
    """A callable doing one step; ``warm_calls`` steps are run first (on the same gradients, restored each time),
    so that what is timed is the steady state of a run rather than its first steps."""
    runtime = Runtime()
    runtime.writes_logs = True
    optimizer = torch.optim.SGD(params, lr=0.0)
    names = names if names is not None else [f"p{i}" for i in range(len(params))]
    trainer = SimpleNamespace(
        world_size=1,
        global_rank=0,
        is_global_zero=True,
        current_epoch=0,
        precision_plugin=None,
        loggers=[],
        callbacks=[callback],
    )
    counter = [0]

    def run() -> None:
        step = GradStep(
            runtime,
            counter[0],
            optimizer,
            0,
            params,
            names,
            multi_optimizer=False,
            with_unit_norms=callback.needs_unit_norms,
        )
        callback.process_step(trainer, None, step)  # type: ignore[arg-type]
        counter[0] += 1
        if counter[0] % flush_every == 0:
            runtime.flush(trainer)  # type: ignore[arg-type]

    if warm_calls:
        saved = [p.grad.clone() for p in params]
        for _ in range(warm_calls):
            torch._foreach_copy_([p.grad for p in params], saved)
            run()
        torch._foreach_copy_([p.grad for p in params], saved)
    return run
