"""The quant layer: quantization parameters, quantize / dequantize / fake-quant forward, and the
per-operand :class:`QuantConfig` of a quantized product.

The affine map between real values ``r`` and integer codes ``q`` (Jacob et al. 2018)::

    r = scale * (q - zero_point)
    q = clip(round(r / scale) + zero_point, qmin, qmax)

Modules: ``affine`` (QParams, ranges, rounding, quantize / dequantize, blocks) and ``config``
(QuantConfig, dynamic_qparams); every name is re-exported here, so
``from jquant.quant import X`` works for each.
"""

from jquant.quant.affine import (
    RANGE_LIMIT,
    ROUNDING_MODES,
    QParams,
    block_qparams,
    block_range,
    block_view,
    check_qparams,
    check_real,
    check_rounding,
    dequantize,
    fake_quant_forward,
    from_blocks,
    is_real_dtype,
    nan_if_invalid,
    qparams_from_data_range,
    qparams_from_range,
    quantize,
    round_to_float_format,
    round_values,
    stochastic_noise,
    to_blocks,
    unblock,
)
from jquant.quant.config import (
    QuantConfig,
    check_config,
    dynamic_qparams,
    fake_quant_config,
    resolve_format,
)

__all__ = [
    "ROUNDING_MODES",
    "QParams",
    "qparams_from_range",
    "qparams_from_data_range",
    "nan_if_invalid",
    "round_values",
    "quantize",
    "dequantize",
    "fake_quant_forward",
    "round_to_float_format",
    "to_blocks",
    "from_blocks",
    "block_qparams",
    "block_view",
    "unblock",
    "block_range",
    "QuantConfig",
    "dynamic_qparams",
    "fake_quant_config",
    "resolve_format",
    "check_config",
    "check_qparams",
    "check_real",
    "check_rounding",
    "is_real_dtype",
    "stochastic_noise",
    "RANGE_LIMIT",
]
