"""Batch-norm folding: the pure fold, and a Linen conv + BN layer trained with folded,
quantized weights (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018, section 3.2).

With ``sigma = sqrt(var + eps)``, BatchNorm after a conv with kernel ``W`` and bias ``b`` is
the conv with the folded kernel and bias::

    W_fold = W * gamma / sigma          (per output channel, the last kernel axis)
    b_fold = beta + (b - mean) * gamma / sigma

Inference quantizes ``W_fold``, so QAT must too. :class:`QConvBN` in training computes the
batch statistics ``(mu_B, sigma_B)`` of the float conv ``conv(x, W)``, folds ``W`` with the
*running* ``sigma_R`` (the weights inference will use, stable from step to step), quantizes
them and rescales the output by ``sigma_R / sigma_B`` so that the layer still normalizes with
the batch statistics::

    y = conv(fq(x), fq(W gamma / sigma_R)) * sigma_R / sigma_B + beta - gamma mu_B / sigma_B

With running statistics (eval, or training after "freezing" BN) the correction is 1::

    y = conv(fq(x), fq(W gamma / sigma_R)) + beta - gamma mu_R / sigma_R

With ``QuantRule.requant`` in phase ``eval`` the layer is the integer program's conv of the
folded kernel (:class:`jquant.nn.requant.RequantOp`: int32 accumulator, the int32 folded bias
``round((beta - gamma mu_R / sigma_R) / (s_x s_w))``, the mode's requantization), which is
how :func:`jquant.convert.convert` converts it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jquant.nn.requant import RequantOp, product_op
from jquant.nn.rules import DEFAULT_RULE, QuantRule
from jquant.nn.state import LinenSlots, check_phase

__all__ = [
    "KERNEL_INIT",
    "fold_bn",
    "folded_kernel",
    "folded_batch_norm",
    "conv_bn",
    "conv_keywords",
    "running_statistics",
    "QConvBN",
]

BATCH_STATS = "batch_stats"
KERNEL_INIT = nn.initializers.lecun_normal()  # nn.Conv's default


def _bn_factor(scale: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """``gamma / sqrt(var + eps)``."""
    return scale * lax.rsqrt(var + eps)


def fold_bn(
    kernel: jax.Array,
    bias: jax.Array | None,
    scale: jax.Array,
    bias_bn: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference BatchNorm into the preceding conv / dense layer.

    ``W_fold = W * gamma / sqrt(var + eps)`` along the last kernel axis (output channels) and
    ``b_fold = beta + (b - mean) * gamma / sqrt(var + eps)``, so that
    ``conv(x, W_fold) + b_fold == BN(conv(x, W) + b)`` with the BN's running statistics.

    Args:
      kernel: conv (``HWIO``) or dense (``IO``) kernel; the last axis is the output channel.
      bias: the layer's bias, or None (no bias, i.e. 0).
      scale, bias_bn, mean, var: BN ``gamma``, ``beta``, running mean and variance, each of
        shape ``(kernel.shape[-1],)``.
      eps: BN epsilon, >= 0.

    Returns:
      ``(W_fold, b_fold)``.

    >>> k, b = fold_bn(jnp.ones((1, 2)), None, jnp.array([2.0, 1.0]), jnp.zeros(2),
    ...                jnp.array([1.0, 0.0]), jnp.array([4.0, 1.0]), eps=0.0)
    >>> k.tolist(), b.tolist()
    ([[1.0, 1.0]], [-1.0, 0.0])
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 1:
        raise ValueError(f"kernel must have an output-channel axis, got shape {kernel.shape}")
    channels = (kernel.shape[-1],)
    named = {"scale": scale, "bias_bn": bias_bn, "mean": mean, "var": var}
    if bias is not None:
        named["bias"] = bias
    for name, v in named.items():
        if jnp.shape(v) != channels:
            raise ValueError(
                f"{name} must have shape {channels} (kernel's last axis), got {jnp.shape(v)}"
            )
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
    factor = _bn_factor(jnp.asarray(scale), jnp.asarray(var), eps)
    b = 0.0 if bias is None else jnp.asarray(bias)
    return kernel * factor, jnp.asarray(bias_bn) + (b - jnp.asarray(mean)) * factor


def _conv_dims(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last input / output (``NHWC``) and ``HWIO`` kernel, for any spatial rank."""
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        (0, ndim - 1, *spatial), (ndim - 1, ndim - 2, *range(ndim - 2)), (0, ndim - 1, *spatial)
    )


def folded_kernel(
    kernel: jax.Array, gamma: jax.Array, mean: jax.Array, var: jax.Array, eps: float
) -> jax.Array:
    """The kernel a folded conv quantizes: ``W gamma / sigma_R`` (:func:`fold_bn`)."""
    return fold_bn(kernel, None, gamma, jnp.zeros_like(gamma), mean, var, eps)[0]


def folded_batch_norm(
    y_quant: jax.Array,
    y_float: jax.Array | None,
    gamma: jax.Array,
    beta: jax.Array,
    mean_r: jax.Array,
    var_r: jax.Array,
    eps: float,
    momentum: float,
    running: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The BatchNorm that follows a conv whose kernel was folded (:func:`folded_kernel`):
    ``(y, running mean, running var)`` from the quantized conv ``y_quant = conv(fq(x),
    fq(W gamma / sigma_R))`` and, for batch statistics, the float ``y_float = conv(x, W)``::

        running: y = y_quant + beta - gamma mu_R / sigma_R              (statistics unchanged)
        batch:   y = y_quant sigma_R / sigma_B + beta - gamma mu_B / sigma_B,
                 r <- momentum r + (1 - momentum) batch               (mu_B, sigma_B of y_float)

    with ``sigma = sqrt(var + eps)``; the one formula of :class:`QConvBN`,
    :class:`NnxQConvBN` and ``jquant.nn.linen.quantize_model(..., fold_bn=True)``.
    """
    if running:
        return y_quant + (beta - mean_r * _bn_factor(gamma, var_r, eps)), mean_r, var_r
    sigma_r = jnp.sqrt(var_r + eps)  # the statistics W was folded with
    axes = tuple(range(y_float.ndim - 1))
    mu_b, var_b = jnp.mean(y_float, axis=axes), jnp.var(y_float, axis=axes)
    new_mean = momentum * mean_r + (1 - momentum) * lax.stop_gradient(mu_b)
    new_var = momentum * var_r + (1 - momentum) * lax.stop_gradient(var_b)
    y = y_quant * (sigma_r * lax.rsqrt(var_b + eps)) + (beta - mu_b * _bn_factor(gamma, var_b, eps))
    return y, new_mean, new_var


def conv_bn(
    quant_conv: Callable,
    x: jax.Array,
    kernel: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    mean_r: jax.Array,
    var_r: jax.Array,
    conv_kw: dict,
    eps: float,
    momentum: float,
    running: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The folded conv + BN of :class:`QConvBN` (module docstring): ``(y, mean, var)`` with
    the updated running statistics (unchanged when ``running``)::

        y, mean, var = folded_batch_norm(quant_conv(x, W gamma / sigma_R), conv(x, W), ...)

    A :class:`~jquant.nn.requant.RequantOp` ``quant_conv`` (requant eval) is the whole layer,
    its folded bias included: ``y = quant_conv(x, W gamma / sigma_R)``.

    Raises:
      ValueError: a RequantOp with batch statistics (the program folds the running ones).
    """
    if isinstance(quant_conv, RequantOp):
        if not running:
            raise ValueError(
                f"layer {quant_conv.slots.path!r}: QuantRule.requant={quant_conv.rule.requant!r} "
                "folds the running BatchNorm statistics, as the program does; call it with "
                "use_running_average=True (or None) in phase 'eval'"
            )
        return (
            quant_conv(x, folded_kernel(kernel, gamma, mean_r, var_r, eps), **conv_kw),
            mean_r,
            var_r,
        )
    y = quant_conv(x, folded_kernel(kernel, gamma, mean_r, var_r, eps), **conv_kw)
    y_float = None if running else lax.conv_general_dilated(x, kernel, **conv_kw)
    return folded_batch_norm(y, y_float, gamma, beta, mean_r, var_r, eps, momentum, running)


def conv_keywords(
    x: jax.Array, kernel_size, strides, padding, feature_group_count: int
) -> dict[str, Any]:
    """``lax.conv_general_dilated`` keywords of a channels-last conv, checking ``x``'s rank."""
    nsp = len(kernel_size)
    if x.ndim != nsp + 2:
        raise ValueError(
            f"QConvBN with kernel_size {tuple(kernel_size)} needs inputs of rank "
            f"{nsp + 2} (batch, spatial..., channels), got shape {x.shape}"
        )
    strides = (strides,) * nsp if isinstance(strides, int) else tuple(strides)
    return dict(
        window_strides=strides,
        padding=padding if isinstance(padding, str) else tuple(padding),
        dimension_numbers=_conv_dims(x.ndim),
        feature_group_count=feature_group_count,
    )


def running_statistics(phase: str, *choices: bool | None) -> bool:
    """First non-None of ``choices``, else running statistics in calibrate / eval."""
    for c in choices:
        if c is not None:
            return c
    return phase in ("calibrate", "eval")


class QConvBN(nn.Module):
    """Conv (no bias) followed by BatchNorm, run with the BN folded into quantized weights.

    Training (batch statistics ``mu_B``, ``sigma_B`` of ``conv(x, W)``, running ones updated
    with ``r <- momentum r + (1 - momentum) batch``)::

        y = conv(fq(x), fq(W gamma / sigma_R)) * sigma_R / sigma_B + beta - gamma mu_B / sigma_B

    Running statistics (eval, or frozen BN during QAT)::

        y = conv(fq(x), fq(W gamma / sigma_R)) + beta - gamma mu_R / sigma_R

    ``fq`` follows ``rule`` and ``phase`` as in :class:`jquant.nn.linen.QConv` (identity in
    the float and calibrate phases). Variables: ``params`` ``kernel`` (``HWIO``), ``scale``
    (gamma), ``bias`` (beta); ``batch_stats`` ``mean``, ``var``; ``quant_stats`` as QConv.

    Attributes:
      features, kernel_size, strides, padding, feature_group_count: as ``nn.Conv``.
      use_running_average: BN with running statistics (no update); None: the call's argument,
        else running statistics in the calibrate and eval phases and batch statistics in the
        float and train phases. Set it in the train phase to freeze BN (Krishnamoorthi).
      momentum, epsilon: as ``nn.BatchNorm``.
      rule, phase: as QConv.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    feature_group_count: int = 1
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    kernel_init: Callable = KERNEL_INIT
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        check_phase(self.phase)
        conv_kw = conv_keywords(
            x, self.kernel_size, self.strides, self.padding, self.feature_group_count
        )
        use_running_average = running_statistics(
            self.phase, use_running_average, self.use_running_average
        )
        in_features = x.shape[-1] // self.feature_group_count
        kernel = self.param(
            "kernel", self.kernel_init, (*self.kernel_size, in_features, self.features)
        )
        gamma = self.param("scale", self.scale_init, (self.features,))
        beta = self.param("bias", self.bias_init, (self.features,))
        ra_mean = self.variable(BATCH_STATS, "mean", jnp.zeros, (self.features,))
        ra_var = self.variable(BATCH_STATS, "var", jnp.ones, (self.features,))

        y, mean, var = conv_bn(
            product_op(LinenSlots(self), self.rule, self.phase, "conv"),
            x,
            kernel,
            gamma,
            beta,
            ra_mean.value,
            ra_var.value,
            conv_kw,
            self.epsilon,
            self.momentum,
            use_running_average,
        )
        if not use_running_average and not self.is_initializing():
            ra_mean.value, ra_var.value = mean, var
        return y


def __getattr__(name: str):
    """``NnxQConvBN`` lives in :mod:`jquant.nn.nnx` (beside the other NNX layers), which
    imports this module; the old import path still works."""
    if name == "NnxQConvBN":
        from jquant.nn.nnx import NnxQConvBN

        return NnxQConvBN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
