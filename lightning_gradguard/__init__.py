"""lightning-gradguard: PyTorch Lightning callbacks that keep training runs from blowing up.

The callbacks are imported on first use, so that ``lightning_gradguard.functional`` (plain PyTorch) can be used
without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {  # public name: the module it lives in
    "ExplosionGuard": "lightning_gradguard.callbacks", "GradGuardCallback": "lightning_gradguard.callbacks",
    "GradientClipping": "lightning_gradguard.callbacks", "GradientExplosionError": "lightning_gradguard.callbacks",
    "GradientNormMonitor": "lightning_gradguard.callbacks", "GradientQuantization": "lightning_gradguard.callbacks",
    "ExplosionEvent": "lightning_gradguard.events", "HostSyncCounter": "lightning_gradguard.utilities",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
