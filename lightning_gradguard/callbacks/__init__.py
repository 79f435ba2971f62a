"""Lightning callbacks of lightning-gradguard."""

from lightning_gradguard.callbacks.base import GradGuardCallback
from lightning_gradguard.callbacks.clipping import GradientClipping
from lightning_gradguard.callbacks.guard import ExplosionGuard, GradientExplosionError
from lightning_gradguard.callbacks.monitor import GradientNormMonitor
from lightning_gradguard.callbacks.quantization import GradientQuantization

__all__ = [
    "ExplosionGuard", "GradGuardCallback", "GradientClipping", "GradientExplosionError", "GradientNormMonitor",
    "GradientQuantization",
]
