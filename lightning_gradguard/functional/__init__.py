"""The math of lightning-gradguard as plain PyTorch functions (no Lightning import), for any training loop."""

from lightning_gradguard.functional.clipping import (
    ClipResult,
    GradientClipper,
    adagc_coefficients,
    agc_coefficients,
    clamp_,
    clip_coefficient,
    scale_,
    unitwise_norms,
    zscore_threshold,
)
from lightning_gradguard.functional.communication import CommStats, QuantizedCommState, quantized_allreduce_hook
from lightning_gradguard.functional.detection import SpikeCheck, SpikeDetector, spike_score, top_layers
from lightning_gradguard.functional.norms import (
    UnitNorms,
    as_local_tensor,
    grad_norms,
    total_norm,
    unit_norms,
    unit_values,
    validate_norm_type,
)
from lightning_gradguard.functional.quantization import (
    GradientQuantizer,
    QuantizationStats,
    decode,
    derive_seed,
    encode,
    levels_for_bits,
    quantize,
)
from lightning_gradguard.functional.stats import EmaMoments, RunningWindow

__all__ = [
    "ClipResult",
    "CommStats",
    "EmaMoments",
    "GradientClipper",
    "GradientQuantizer",
    "QuantizationStats",
    "QuantizedCommState",
    "RunningWindow",
    "SpikeCheck",
    "SpikeDetector",
    "UnitNorms",
    "adagc_coefficients",
    "agc_coefficients",
    "as_local_tensor",
    "clamp_",
    "clip_coefficient",
    "decode",
    "derive_seed",
    "encode",
    "grad_norms",
    "levels_for_bits",
    "quantize",
    "quantized_allreduce_hook",
    "scale_",
    "spike_score",
    "top_layers",
    "total_norm",
    "unit_norms",
    "unit_values",
    "unitwise_norms",
    "validate_norm_type",
    "zscore_threshold",
]
