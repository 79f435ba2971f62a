"""The math of lightning-gradguard as plain PyTorch functions (no Lightning import), for any training loop."""

from lightning_gradguard.functional.clipping import (
    ClipResult, GradientClipper, adagc_coefficients, agc_coefficients, clamp_, clip_coefficient, output_layer, scale_,
    zscore_threshold,
)
from lightning_gradguard.functional.communication import CommStats, QuantizedCommState, quantized_allreduce_hook
from lightning_gradguard.functional.detection import SpikeCheck, SpikeDetector, spike_score, top_layers
from lightning_gradguard.functional.norms import (
    StepGradients, UnitNorms, as_local_tensor, full_tensor_norms, grad_norms, total_norm, unit_norms, units_of,
    validate_norm_type,
)
from lightning_gradguard.functional.quantization import (
    GradientQuantizer, QuantizationStats, decode, derive_seed, encode, levels_for_bits, quantize,
)
from lightning_gradguard.functional.stats import EmaMoments, RunningWindow

__all__ = [
    "ClipResult", "CommStats", "EmaMoments", "GradientClipper", "GradientQuantizer", "QuantizationStats",
    "QuantizedCommState", "RunningWindow", "SpikeCheck", "SpikeDetector", "StepGradients", "UnitNorms",
    "adagc_coefficients", "agc_coefficients", "as_local_tensor", "clamp_", "clip_coefficient", "decode", "derive_seed",
    "encode", "full_tensor_norms", "grad_norms", "levels_for_bits", "output_layer", "quantize",
    "quantized_allreduce_hook", "scale_", "spike_score", "top_layers", "total_norm", "unit_norms", "units_of",
    "validate_norm_type", "zscore_threshold",
]
