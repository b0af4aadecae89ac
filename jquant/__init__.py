"""jquant: a JAX toolkit for quantization research.

>>> import jquant as jq
>>> qp = jq.qparams_from_range(-1.0, 1.0, jq.int8, symmetric=True)
>>> int(jq.quantize(0.5, qp, jq.int8))
64
"""

from jquant import calibration, codebook, integer, metrics, ops
from jquant.calibration import Observer, calibrate
from jquant.estimators import ESTIMATORS, fake_quant, pact_qparams
from jquant.formats import (
    NAMED_FORMATS,
    BinaryFormat,
    FloatFormat,
    Format,
    IntFormat,
    bf16,
    binary,
    fp8_e4m3,
    fp8_e5m2,
    fp16,
    get_format,
    int2,
    int3,
    int4,
    int8,
    int16,
    uint4,
    uint8,
)
from jquant.ops import quantized_conv_general_dilated, quantized_dot_general
from jquant.quant import (
    ROUNDING_MODES,
    QParams,
    QuantConfig,
    block_qparams,
    dequantize,
    dynamic_qparams,
    fake_quant_forward,
    from_blocks,
    qparams_from_range,
    quantize,
    round_to_float_format,
    round_values,
    to_blocks,
)

__version__ = "0.1.0"
