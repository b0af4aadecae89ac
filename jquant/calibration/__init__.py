"""Calibration: ranges for activations (and weights) from data, one-shot or streamed.

Range estimators are pure functions ``f(x, [fmt], *, axis=...) -> (rmin, rmax)`` for
:func:`jquant.qparams_from_range`; ``axis`` names the axes that keep their own range (per
channel; blocks: :func:`block_ranges`, :func:`block_observer`, :func:`method_block_observer`),
and results have the keepdims shape:

- :func:`minmax`, :func:`absmax`, :func:`percentile` (two-sided or symmetric);
- :func:`mse`: the clip range of least quantization MSE for ``fmt``, searched on device and
  vmappable over ``IntFormat(bits=...)``;
- :func:`kl`: TensorRT entropy calibration over a histogram of ``|x|`` (2048 bins);
- :func:`aciq`: Banner et al. (2019) analytical clipping for Gaussian / Laplace priors.

Calibration methods are objects (:class:`Calibration`: :class:`MinMax`, :class:`EmaMinMax`,
:class:`Percentile`, :class:`MSE`, :class:`KL`, :class:`ACIQ`), each an observer factory and a
one-shot range, with their settings as fields (``Percentile(99.9)``); one registry
(:func:`register_observer` / :func:`get_observer`) resolves the names ``"minmax"``, ``"ema"``,
``"percentile"``, ``"mse"``, ``"kl"``, ``"aciq"``. A method written outside jquant (any object
with ``init`` / ``update`` / ``result`` / ``bounds``) works wherever a built-in does.

Streaming observers (:class:`Observer`: pure ``init`` / ``update`` / ``result`` over NamedTuple
states, all jit-able): :func:`running_minmax`, :func:`ema_minmax` and :func:`histogram`
(growing range, serving percentile, MSE and KL), each per tensor or per ``axis``, hence
block-wise through :func:`block_observer`. :func:`calibrate` runs a Flax model over a
representative dataset so that its layers' observers (``quant_stats`` collection) see it.

NaN and +-Inf: ignored by every estimator and observer (the range is that of the finite
values); observers count them in ``state.nonfinite`` so that callers can check. Data with no
finite value, or constant data, gives a finite scale. Empty arrays and empty datasets raise
``ValueError``.
"""

from jquant.calibration.blocks import block_observer, block_ranges, method_block_observer
from jquant.calibration.driver import calibrate, calibration_loop
from jquant.calibration.observers import (
    ACIQ,
    HISTOGRAM_METHODS,
    KL,
    MSE,
    Calibration,
    EmaMinMax,
    HistogramState,
    MinMax,
    MinMaxState,
    Observer,
    Percentile,
    calibration_label,
    check_observer,
    ema_minmax,
    get_observer,
    histogram,
    observed_range,
    observer_names,
    register_observer,
    running_minmax,
)
from jquant.calibration.ranges import (
    ACIQ_PRIORS,
    absmax,
    aciq,
    aciq_clip,
    aciq_mse,
    kl,
    minmax,
    mse,
    percentile,
)

__all__ = [
    "ACIQ",
    "KL",
    "MSE",
    "Calibration",
    "EmaMinMax",
    "MinMax",
    "Percentile",
    "calibration_label",
    "check_observer",
    "get_observer",
    "observed_range",
    "observer_names",
    "register_observer",
    "ACIQ_PRIORS",
    "HISTOGRAM_METHODS",
    "HistogramState",
    "MinMaxState",
    "Observer",
    "absmax",
    "block_observer",
    "block_ranges",
    "method_block_observer",
    "aciq",
    "aciq_clip",
    "aciq_mse",
    "calibrate",
    "calibration_loop",
    "ema_minmax",
    "histogram",
    "kl",
    "minmax",
    "mse",
    "percentile",
    "running_minmax",
]
