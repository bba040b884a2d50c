"""Dynamic quantization of linear layers (fp8 e4m3fn, per-channel weights, per-row
activations). See :mod:`difforge.quant.fp8` for the numerics and
:func:`difforge.diffusers.quantize.quantize_pipe` for whole pipelines."""

from __future__ import annotations

from difforge.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    dequantize,
    fp8_linear,
    fp8_linear_reference,
    quantize_rows,
    quantize_weight,
    scaled_mm_available,
)
from difforge.quant.select import (
    DEFAULT_EXCLUDE,
    DEFAULT_MIN_FEATURES,
    ModuleFilter,
    QuantizeReport,
    quantize_linears,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_MIN_FEATURES",
    "FP8_DTYPE",
    "FP8_MAX",
    "Fp8Linear",
    "ModuleFilter",
    "QuantizeReport",
    "dequantize",
    "fp8_linear",
    "fp8_linear_reference",
    "quantize_linears",
    "quantize_rows",
    "quantize_weight",
    "scaled_mm_available",
]
