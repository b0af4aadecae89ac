"""The eval forward of a layer with ``QuantRule.requant``: what the integer kernel computes.

A quantized Conv / Dense in phase ``eval`` with ``requant=m`` does not round its float output
once; it computes the integer program's layer on the codes of its input and weight::

    d_x = q_x - z_x,  q_x = quantize(x, input QParams)      (int32)
    q_w = quantize(W, kernel QParams)                       (int8 codes, symmetric)
    A   = sum d_x q_w + b_int                               (int32, exact: lax with int32)
    q_y = clamp(MBQM(A, M) + z_y, qmin, qmax)               (jquant.integer.requantize, mode m)
    y   = s_y (q_y - z_y)                                   (float32, the layer's output)

Padding holds ``d_x = 0`` (real 0, the program's ``x_zp``). A relu after the layer is
``s_y (max(q_y, z_y) - z_y)``, the program's fused clamp, exactly; max pooling and reshapes
keep the grid. A residual ``QAdd`` with ``requant=m`` is TFLite's ``ADD``
(:func:`jquant.integer.add`) of its operands' codes, a ``QAvgPool`` TFLite's
``AVERAGE_POOL_2D`` (:func:`jquant.integer.avg_pool`, the mean code rounded half away from
zero, on the pooled value's grid) and a ``QMean`` TFLite's ``MEAN``
(:func:`jquant.integer.mean`, requantized in mode ``m``). Linen and NNX layers share these
functions.

``b_int = round(b / (s_x s_w))``, the multipliers ``M`` (computed host-side, in float64 for
``double`` / ``single``) and the output's ``s_y``, ``z_y`` and ``(qmin, qmax)`` are the
program's: the output QParams are those :func:`jquant.convert.convert` gives the layer's
output (the next layer's input quantizer, the model's output QParams, or a residual add's).
:func:`jquant.convert.with_requant_constants` stores them, per layer, in the statistic
``requant`` (Linen: ``quant_stats/<path>/requant``; NNX: the layer's ``QuantStat`` attribute
``requant``). A BatchNorm after the layer is folded
into those constants as ``convert`` folds it (``A`` times ``sign(gamma)`` per channel) and
passes its input through. Training and calibration are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import integer
from jquant.formats import int8
from jquant.nn.inject import QuantOp, operand_qparams, pool_activation
from jquant.nn.rules import QuantRule
from jquant.nn.state import Slots, kernel_qparams
from jquant.quant import QParams, quantize

__all__ = [
    "REQUANT_STAT",
    "RequantOp",
    "requantizes",
    "product_op",
    "check_no_constants",
    "pooled",
    "requant_constants",
    "requantized_add",
    "requantized_avg_pool",
    "requantized_mean",
]

REQUANT_STAT = "requant"  # the name of the stored constants (a layer's statistic)
_LAX_OPS = {"dot_general": lax.dot_general, "conv": lax.conv_general_dilated}


def requantizes(rule: QuantRule | None, phase: str) -> bool:
    """Whether a layer with ``rule`` computes the integer program in ``phase``: phase
    ``eval`` and ``rule.requant`` set (not ``keep_float``)."""
    return phase == "eval" and rule is not None and rule.requant is not None and not rule.keep_float


def product_op(slots: Slots, rule: QuantRule, phase: str, kind: str) -> QuantOp | RequantOp:
    """The product a Conv / Dense runs: :class:`RequantOp` when it :func:`requantizes` (the
    layer must then drop its own float bias: the op adds the int32 one), else
    :class:`~jquant.nn.inject.QuantOp`."""
    if requantizes(rule, phase):
        return RequantOp(slots, rule, kind)
    return QuantOp(slots, rule, phase, kind)


def check_no_constants(slots: Slots, rule: QuantRule | None, phase: str, what: str) -> None:
    """Raises ValueError when a layer in phase ``eval`` holds the program's constants but does
    not requantize (its rule lacks ``requant``): it would silently compute something else."""
    if (
        phase == "eval"
        and not requantizes(rule, phase)
        and slots.get_stat(REQUANT_STAT) is not None
    ):
        raise ValueError(
            f"{what} {slots.path!r} holds requantization constants "
            "(jquant.convert.with_requant_constants) but its rule has no requant: give it a "
            "rule with QuantRule.requant set, or use variables without those constants"
        )


def requant_constants(slots: Slots, rule: QuantRule) -> dict[str, Any]:
    """The layer's stored requantization constants (module docstring).

    Raises:
      ValueError: naming the layer, when none are stored.
    """
    stored = slots.get_stat(REQUANT_STAT)
    if stored is None:
        raise ValueError(
            f"layer {slots.path!r}: requant={rule.requant!r} in phase 'eval' needs the "
            "program's requantization constants: run jquant.convert.with_requant_constants "
            "(after calibration) and apply with the variables it returns"
        )
    return stored


def _on_grid(codes: jax.Array, c: dict[str, Any]) -> jax.Array:
    """``s_y (clamp(q, qmin, qmax) - z_y)`` in float32."""
    q = jnp.clip(codes.astype(jnp.int32), c["clamp"][0], c["clamp"][1])
    return jnp.asarray(c["out_scale"], jnp.float32) * (q - c["out_zp"]).astype(jnp.float32)


def _requant(c: dict[str, Any], mode: str) -> integer.Requant:
    return integer.Requant(c["multiplier"], c["shift"], mode)


@dataclasses.dataclass(frozen=True, eq=False)
class RequantOp:
    """``lax.dot_general`` / ``lax.conv_general_dilated`` look-alike computing the integer
    program's layer (module docstring), bias and requantization included: the layer runs it
    with ``use_bias=False``.

    Args:
      slots: the layer's variables (input QParams, stored constants).
      rule: its rule, with ``requant`` set.
      kind: ``"dot_general"`` or ``"conv"``.
    """

    slots: Any
    rule: QuantRule
    kind: str

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
        path, rule = self.slots.path, self.rule
        if kwargs.get("out_sharding", 0) is None:  # nnx.Conv passes it
            del kwargs["out_sharding"]
        kwargs.pop("preferred_element_type", None)
        kwargs.pop("precision", None)
        if self.kind == "dot_general":
            (_, rhs_contract), (_, rhs_batch) = args[0] if args else kwargs["dimension_numbers"]
            if rhs.ndim != 2 or tuple(rhs_batch) or tuple(rhs_contract) != (0,):
                raise ValueError(
                    f"layer {path!r}: requant={rule.requant!r} supports Dense kernels "
                    f"(in, out) only (the program's FULLY_CONNECTED), got a kernel of shape "
                    f"{rhs.shape}"
                )
        w_cfg = rule.weight_config(rhs.ndim)
        a_cfg = rule.act_config()
        qa, qw = operand_qparams(self.slots, rule, "eval", lhs, rhs, w_cfg)
        if qw is None:  # not learned: the kernel's own range, as ops derives it
            qw = kernel_qparams(rhs, w_cfg, rule.weight_scale_bound)
        zx = jnp.round(jnp.reshape(qa.zero_point, ())).astype(jnp.int32)
        dx = quantize(lhs, qa, a_cfg.fmt, rounding=a_cfg.rounding).astype(jnp.int32) - zx
        qw_codes = quantize(rhs, qw, w_cfg.fmt, rounding=w_cfg.rounding).astype(jnp.int32)
        acc = _LAX_OPS[self.kind](dx, qw_codes, *args, preferred_element_type=jnp.int32, **kwargs)
        c = requant_constants(self.slots, rule)
        if "w_sign" in c:  # a folded BatchNorm's sign(gamma), moved into the weight codes
            acc = acc * c["w_sign"]
        codes = integer.requantize(acc + c["b"], _requant(c, rule.requant), c["out_zp"])
        return _on_grid(codes, c)


def requantized_add(slots: Slots, rule: QuantRule, a: jax.Array, b: jax.Array) -> jax.Array:
    """TFLite ``ADD`` of the codes of ``a`` and ``b`` (:func:`jquant.integer.add` in mode
    ``rule.requant``) back on the output grid: ``s_y (add(q_a, q_b) - z_y)`` with
    ``q_a = clamp(round(a / s_a) + z_a)`` (likewise ``b``) and the constants stored for
    that mode."""
    mode = rule.requant
    c = requant_constants(slots, rule)[mode]
    codes = [
        quantize(v, QParams(c[k]["scale"], c[k]["zero_point"]), int8).astype(jnp.int8)
        for k, v in (("a", a), ("b", b))
    ]
    rq = integer.AddRequant(
        _requant(c["a"], mode),
        _requant(c["b"], mode),
        _requant(c["out"], mode),
        integer.add_requant(1.0, 1.0, 1.0, mode).left_shift,
    )
    y = integer.add(
        *codes,
        a_zp=c["a"]["zero_point"],
        b_zp=c["b"]["zero_point"],
        out_scale=c["out_scale"],
        out_zp=c["out_zp"],
        requant=rq,
    )
    return _on_grid(y, c)


def _spatial_2d(fn, x: jax.Array) -> jax.Array:
    """``fn`` of an NHWC kernel applied to ``(N, L, C)`` as ``H = 1`` (as the program runs it)."""
    return fn(x[:, None])[:, 0] if x.ndim == 3 else fn(x)


def requantized_avg_pool(
    slots: Slots, rule: QuantRule, x: jax.Array, window, strides, padding
) -> jax.Array:
    """TFLite ``AVERAGE_POOL_2D`` (:func:`jquant.integer.avg_pool`) of the codes of ``x`` on
    the pooled value's grid ``(s, z)`` (stored: the program's QParams of that value), back on
    that grid: ``s (round_half_away(sum q / n) - z)`` over the ``n`` valid elements."""
    c = requant_constants(slots, rule)
    cfg = rule.act_config()
    qp = QParams(c["out_scale"], c["out_zp"])
    codes = quantize(x, qp, int8, rounding=cfg.rounding).astype(jnp.int8)
    window, spatial = tuple(window), x.ndim - 2
    strides = (1,) * len(window) if strides is None else tuple(strides)  # as ops / Flax
    if not isinstance(padding, str):
        padding = ((0, 0),) * (2 - spatial) + tuple(tuple(p) for p in padding)
    lift = (1,) * (2 - spatial)
    y = _spatial_2d(lambda x4: integer.avg_pool(x4, lift + window, lift + strides, padding), codes)
    return _on_grid(y, c)


def requantized_mean(slots: Slots, rule: QuantRule, x: jax.Array) -> jax.Array:
    """TFLite ``MEAN`` over the spatial axes (:func:`jquant.integer.mean`, mode
    ``rule.requant``) of the codes of ``x``, back on the output grid:
    ``s_y (clamp(MBQM(sum (q_x - z_x), M / n) + z_y) - z_y)`` with the stored QParams and
    multipliers of that mode."""
    mode = rule.requant
    c = requant_constants(slots, rule)[mode]
    codes = quantize(x, QParams(c["x_scale"], c["x_zp"]), int8).astype(jnp.int8)
    axes = tuple(range(1, x.ndim - 1))
    count = int(np.prod([x.shape[a] for a in axes]))
    y = integer.mean(
        codes,
        x_zp=c["x_zp"],
        out_zp=c["out_zp"],
        axis=axes,
        requant=integer.MeanRequant(_requant(c, mode), count),
    )
    return _on_grid(y, c)


def pooled(
    slots: Slots, rule: QuantRule, phase: str, kind: str, x: jax.Array, window, strides, padding
) -> jax.Array:
    """The forward of ``QAvgPool`` / ``QMaxPool`` (Linen and NNX). When the layer
    :func:`requantizes`: the program's average pool (:func:`requantized_avg_pool`), or the
    max pool of ``x`` itself (a max of grid values is the program's max code, on the grid).
    Otherwise :func:`jquant.nn.inject.pool_activation` (fake-quant input, TFLite pooling)."""
    if requantizes(rule, phase):
        if kind == "avg":
            return requantized_avg_pool(slots, rule, x, window, strides, padding)
        strides = None if strides is None else tuple(strides)
        return nn.max_pool(x, tuple(window), strides=strides, padding=padding)
    check_no_constants(slots, rule, phase, "pooling layer")
    return pool_activation(slots, rule, phase, kind, x, window, strides, padding)
