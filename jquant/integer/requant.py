"""Requantization: int32 accumulator -> int8 output code, with fused relu / relu6 clamps.

TFLite's int8 spec (and Jacob et al. 2018, eq. 7): with ``acc = sum (x - x_zp) w + b``::

    y = clamp(acc * M + y_zp, act_min, act_max),   M = x_scale * w_scale[c] / y_scale

where ``acc * M`` is :func:`~jquant.integer.fixed_point.multiply_by_quantized_multiplier` in
one of the modes ``double`` (TFLite reference kernels), ``single`` (TFLITE_SINGLE_ROUNDING) or
``fp32`` (XNNPACK / ONNX Runtime). The constants are computed once, host-side, into a
:class:`Requant`; kernels accept either a mode name (and the scales) or a precomputed
:class:`Requant`, which is what a model converter passes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import int8
from jquant.integer.checks import check_bias, check_scale, check_zero_point, concrete
from jquant.integer.fixed_point import (
    MULTIPLIER_MODES,
    check_mode,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)

__all__ = [
    "ACTIVATIONS",
    "Requant",
    "requant_from_multiplier",
    "requant_from_scales",
    "activation_range",
    "requantize",
]

ACTIVATIONS = (None, "relu", "relu6")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["multiplier", "shift"], meta_fields=["mode"]
)
@dataclasses.dataclass(frozen=True)
class Requant:
    """Precomputed requantization constants; ``mode`` is static, the arrays are leaves.

    ``double`` / ``single``: ``multiplier`` is the int32 ``M0`` and ``shift`` the exponent of
    ``M = M0 * 2^(shift - 31)``. ``fp32``: ``multiplier`` is the float32 ``M``, ``shift`` 0.
    Shapes are ``()`` (per tensor) or ``(C,)`` (per output channel, the last axis).
    """

    multiplier: jax.Array
    shift: jax.Array
    mode: str = "double"

    def __post_init__(self):
        check_mode(self.mode)


def requant_from_multiplier(m, mode: str = "double") -> Requant:
    """:class:`Requant` for the real multiplier(s) ``m``: ``quantize_multiplier(m)`` for
    ``double`` / ``single`` (float64, host-side), ``float32(m)`` for ``fp32``."""
    check_mode(mode)
    if mode == "fp32":
        m = np.asarray(m, np.float32)
        return Requant(m, np.zeros(m.shape, np.int32), mode)
    m0, shift = quantize_multiplier(m, mode)
    return Requant(m0, shift, mode)


def requant_from_scales(x_scale, w_scale, out_scale, mode: str = "double") -> Requant:
    """:class:`Requant` for ``M = x_scale * w_scale / out_scale``, evaluated as each runtime does.

    ``double`` / ``single`` (TFLite): ``float64(x_scale) * float64(w_scale) /
    float64(out_scale)``, then :func:`quantize_multiplier`. ``fp32`` (XNNPACK, ONNX Runtime):
    ``(float32(x_scale) * float32(w_scale)) / float32(out_scale)`` in float32, in that order.
    Both run host-side in NumPy, so the scales must be concrete: XLA on CPU would rewrite the
    division by a scalar as a multiplication by its reciprocal, which is not bit-exact.

    ``w_scale`` may be per output channel, shape ``(C,)``; the others are per tensor.
    """
    check_mode(mode)
    x_scale = check_scale("x_scale", x_scale)
    out_scale = check_scale("out_scale", out_scale)
    w_scale = check_scale("w_scale", w_scale, size=np.size(w_scale))
    scales = [concrete(s) for s in (x_scale, w_scale, out_scale)]
    if any(s is None for s in scales):
        raise TypeError(
            f"requant={mode!r} computes its multipliers host-side: the scales must be concrete "
            "(not traced); pass a precomputed Requant under jit instead"
        )
    if mode == "fp32":
        xs, ws, ys = (s.astype(np.float32) for s in scales)
        return requant_from_multiplier((xs * ws) / ys, mode)
    xs, ws, ys = (s.astype(np.float64) for s in scales)
    return requant_from_multiplier(xs * ws / ys, mode)


def activation_range(activation: str | None, out_scale, out_zp, mode: str = "double"):
    """Clamp ``(act_min, act_max)`` of a fused activation on the int8 output grid.

    ``None``: ``(-128, 127)``; ``relu``: ``(max(-128, y_zp), 127)``; ``relu6``: the top is
    ``min(127, y_zp + round(6 / y_scale))`` with ``6 / y_scale`` in float32 (host-side, so
    ``out_scale`` must be concrete), rounded half away from zero (TFLite reference) or, in mode
    ``fp32``, half to even (XNNPACK). Returns int32 scalars (JAX arrays).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_mode(mode)
    zp = check_zero_point("out_zp", out_zp)
    lo, hi = jnp.int32(int8.qmin), jnp.int32(int8.qmax)
    if activation is None:
        return lo, hi
    lo = jnp.maximum(lo, zp)
    if activation == "relu6":
        s = concrete(check_scale("out_scale", out_scale))
        if s is None:
            raise TypeError("activation='relu6' needs a concrete out_scale (not traced)")
        v = np.float32(6.0) / s.astype(np.float32)
        r = np.rint(v) if mode == "fp32" else np.floor(np.float64(v) + 0.5)  # v > 0: exact
        hi = jnp.minimum(hi, zp + jnp.int32(r))
    return lo, hi


def requantize(acc: jax.Array, rq: Requant, out_zp, act_min=None, act_max=None) -> jax.Array:
    """int32 ``acc`` -> int8 ``clamp(acc * M + out_zp, act_min, act_max)`` in ``rq.mode``.

    ``fp32`` clamps in float before rounding half to even (XNNPACK's order); with integer
    bounds this equals rounding first. ``act_min`` / ``act_max`` default to -128 / 127.
    """
    if not isinstance(rq, Requant):
        raise TypeError(f"rq must be a Requant, got {type(rq).__name__}")
    acc = jnp.asarray(acc)
    if acc.dtype != jnp.int32:
        raise TypeError(f"acc must be an int32 array, got dtype {acc.dtype}")
    zp = check_zero_point("out_zp", out_zp)
    lo = jnp.int32(int8.qmin) if act_min is None else jnp.asarray(act_min, jnp.int32)
    hi = jnp.int32(int8.qmax) if act_max is None else jnp.asarray(act_max, jnp.int32)
    if rq.mode == "fp32":
        y = acc.astype(jnp.float32) * jnp.asarray(rq.multiplier, jnp.float32)
        y = jnp.clip(y, (lo - zp).astype(jnp.float32), (hi - zp).astype(jnp.float32))
        return (jnp.round(y).astype(jnp.int32) + zp).astype(jnp.int8)
    y = multiply_by_quantized_multiplier(acc, rq.multiplier, rq.shift, rq.mode) + zp
    return jnp.clip(y, lo, hi).astype(jnp.int8)


def resolve_requant(requant: str | Requant, x_scale, w_scale, out_scale) -> Requant:
    """A :class:`Requant` from a mode name (computed from the scales) or passed through."""
    if isinstance(requant, Requant):
        return requant
    if requant not in MULTIPLIER_MODES:
        raise ValueError(f"requant must be a Requant or one of {MULTIPLIER_MODES}, got {requant!r}")
    return requant_from_scales(x_scale, w_scale, out_scale, requant)


class LinearEpilogue(NamedTuple):
    """Validated constants of the output stage of conv / dense (see :func:`linear_epilogue`)."""

    w_sum: jax.Array
    b: jax.Array
    x_zp: jax.Array
    rq: Requant
    out_zp: jax.Array
    act_min: jax.Array
    act_max: jax.Array

    def __call__(self, acc: jax.Array) -> jax.Array:
        """``requantize(acc - x_zp * sum(w) + b)``, clamped to the activation's range."""
        acc = acc - self.x_zp * self.w_sum + self.b
        return requantize(acc, self.rq, self.out_zp, self.act_min, self.act_max)


def linear_epilogue(
    w: jax.Array,
    b,
    *,
    x_scale,
    x_zp,
    w_scale,
    out_scale,
    out_zp,
    activation: str | None,
    requant: str | Requant,
) -> LinearEpilogue:
    """Checks the arguments of conv / dense and prepares their output stage, before any
    computation: from ``acc = sum x w`` (raw int8 codes, int32) to int8 codes.

    ``sum_k (x_k - x_zp) w_kc = sum_k x_k w_kc - x_zp sum_k w_kc`` (the sum over every kernel
    tap, padding included: padded inputs hold ``x_zp``, i.e. real 0). ``w`` has output
    channels last; int32 arithmetic wraps, so the result is exact whenever the true
    accumulator fits in int32 (:func:`~jquant.integer.checks.check_accumulator`).
    """
    channels = w.shape[-1]
    b = check_bias(b, channels)
    x_zp = check_zero_point("x_zp", x_zp)
    if not isinstance(requant, Requant):
        w_scale = check_scale("w_scale", w_scale, size=channels)
    rq = resolve_requant(requant, x_scale, w_scale, out_scale)
    if np.shape(rq.multiplier) not in ((), (1,), (channels,)):
        raise ValueError(
            f"requant multipliers must have shape (), (1,) or ({channels},), "
            f"got {np.shape(rq.multiplier)}"
        )
    lo, hi = activation_range(activation, out_scale, out_zp, rq.mode)
    w_sum = jnp.sum(w.astype(jnp.int32).reshape(-1, channels), axis=0)
    return LinearEpilogue(w_sum, b, x_zp, rq, check_zero_point("out_zp", out_zp), lo, hi)
