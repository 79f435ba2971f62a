"""Lightning callbacks of lightning-gradguard."""

from lightning_gradguard.callbacks.base import GradGuardCallback
from lightning_gradguard.callbacks.monitor import GradientNormMonitor

__all__ = ["GradGuardCallback", "GradientNormMonitor"]
