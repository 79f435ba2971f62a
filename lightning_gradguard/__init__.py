"""lightning-gradguard: PyTorch Lightning callbacks that keep training runs from blowing up."""

from lightning_gradguard.callbacks import (
    ExplosionGuard,
    GradGuardCallback,
    GradientClipping,
    GradientExplosionError,
    GradientNormMonitor,
    GradientQuantization,
)
from lightning_gradguard.events import ExplosionEvent
from lightning_gradguard.utilities import HostSyncCounter

__version__ = "0.1.0"

__all__ = [
    "ExplosionEvent",
    "ExplosionGuard",
    "GradGuardCallback",
    "GradientClipping",
    "GradientExplosionError",
    "GradientNormMonitor",
    "GradientQuantization",
    "HostSyncCounter",
    "__version__",
]
