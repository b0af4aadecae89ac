"""Integer-only inference: fixed-point arithmetic and int8 kernels with TFLite semantics.

int8 NHWC activations, int8 HWIO (or ``(in, out)``) weights, int32 bias and accumulators;
requantization in the modes ``double`` (TFLite reference kernels), ``single``
(``TFLITE_SINGLE_ROUNDING``) and ``fp32`` (XNNPACK, ONNX Runtime), each bit-exact.
No ``jax_enable_x64``: 64-bit products are emulated with 32-bit words.
"""

from jquant.integer.add import AddRequant, add, add_requant
from jquant.integer.checks import accumulator_bound, check_accumulator
from jquant.integer.concat import concatenate
from jquant.integer.conv import conv2d
from jquant.integer.dense import dense
from jquant.integer.fixed_point import (
    MULTIPLIER_MODES,
    fixed_point_product,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from jquant.integer.mean import MeanRequant, mean, mean_requant
from jquant.integer.pool import avg_pool, global_avg_pool, max_pool, rounded_average
from jquant.integer.requant import (
    ACTIVATIONS,
    Requant,
    activation_range,
    requant_from_multiplier,
    requant_from_scales,
    requantize,
)

__all__ = [
    "rounded_average",
    "ACTIVATIONS",
    "MULTIPLIER_MODES",
    "AddRequant",
    "MeanRequant",
    "Requant",
    "accumulator_bound",
    "activation_range",
    "add",
    "add_requant",
    "avg_pool",
    "check_accumulator",
    "concatenate",
    "conv2d",
    "dense",
    "fixed_point_product",
    "global_avg_pool",
    "max_pool",
    "mean",
    "mean_requant",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "requant_from_multiplier",
    "requant_from_scales",
    "requantize",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
