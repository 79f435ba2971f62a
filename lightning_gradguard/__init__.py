"""lightning-gradguard: PyTorch Lightning callbacks that keep training runs from blowing up."""

from lightning_gradguard.callbacks import GradGuardCallback, GradientNormMonitor
from lightning_gradguard.utilities import HostSyncCounter

__version__ = "0.1.0"

__all__ = ["GradGuardCallback", "GradientNormMonitor", "HostSyncCounter", "__version__"]
