"""The math of lightning-gradguard as plain PyTorch functions (no Lightning import), for any training loop."""

from lightning_gradguard.functional.norms import as_local_tensor, grad_norms, total_norm, validate_norm_type

__all__ = ["as_local_tensor", "grad_norms", "total_norm", "validate_norm_type"]
