"""int8 elementwise add of two tensors with different scales (TFLite ``ADD``, ONNX ``QLinearAdd``).

``double`` / ``single`` (TFLite, ``left_shift = 20``): both inputs are brought to a common
scale ``2 max(s_a, s_b) / 2^20`` in int32, summed, and rescaled to the output::

    a' = MBQM((a - a_zp) * 2^20, M_a),   M_a = s_a / (2 max(s_a, s_b))
    b' = MBQM((b - b_zp) * 2^20, M_b),   M_b = s_b / (2 max(s_a, s_b))
    y  = clamp(MBQM(a' + b', M_y) + y_zp),   M_y = 2 max(s_a, s_b) / (2^20 s_y)

with ``MBQM`` = :func:`~jquant.integer.fixed_point.multiply_by_quantized_multiplier` and the
multipliers computed in float64.

There is no ``fp32`` add: XNNPACK and ONNX Runtime add with integer multipliers of their own
(not emulated yet), and the float formula ``(s_a (a - a_zp) + s_b (b - b_zp)) / s_y`` cannot
be evaluated bit-exactly under XLA on CPU, which contracts ``x * y + z`` into an FMA and
rewrites division by a broadcast scalar as multiplication by its reciprocal.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.integer.checks import check_int8, check_scale, check_zero_point, concrete
from jquant.integer.fixed_point import (
    multiply_by_quantized_multiplier,
)
from jquant.integer.requant import Requant, activation_range, requant_from_multiplier

__all__ = ["ADD_MODES", "AddRequant", "add_requant", "add"]

ADD_MODES = ("double", "single")
LEFT_SHIFT = 20  # TFLite's headroom for int8 inputs (15 for int16)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["a", "b", "out"], meta_fields=["left_shift"]
)
@dataclasses.dataclass(frozen=True)
class AddRequant:
    """Precomputed constants of :func:`add`: the multipliers of each input and the output."""

    a: Requant
    b: Requant
    out: Requant
    left_shift: int = LEFT_SHIFT

    @property
    def mode(self) -> str:
        return self.a.mode


def add_requant(a_scale, b_scale, out_scale, mode: str = "double") -> AddRequant:
    """:class:`AddRequant` from the scales, host-side in float64 (modes ``double`` / ``single``)."""
    if mode not in ADD_MODES:
        raise ValueError(f"requant must be one of {ADD_MODES} for add, got {mode!r}")
    sa, sb, sy = (
        check_scale(name, s)
        for name, s in (("a_scale", a_scale), ("b_scale", b_scale), ("out_scale", out_scale))
    )
    scales = [concrete(s) for s in (sa, sb, sy)]
    if any(s is None for s in scales):
        raise TypeError(
            f"requant={mode!r} computes its multipliers host-side in float64: the scales must "
            "be concrete (not traced); pass a precomputed AddRequant under jit instead"
        )
    sa, sb, sy = (s.astype(np.float32) for s in scales)
    twice_max = np.float64(2 * np.maximum(sa, sb))
    return AddRequant(
        requant_from_multiplier(np.float64(sa) / twice_max, mode),
        requant_from_multiplier(np.float64(sb) / twice_max, mode),
        requant_from_multiplier(twice_max / np.float64(np.float32(1 << LEFT_SHIFT) * sy), mode),
        LEFT_SHIFT,
    )


def add(
    a: jax.Array,
    b: jax.Array,
    *,
    a_scale=None,
    a_zp=0,
    b_scale=None,
    b_zp=0,
    out_scale=None,
    out_zp=0,
    activation: str | None = None,
    requant: str | AddRequant = "double",
) -> jax.Array:
    """int8 ``y ~= (s_a (a - a_zp) + s_b (b - b_zp)) / s_y + y_zp`` (module docstring: exact
    integer scheme per mode). ``a`` and ``b`` must have the same shape (no broadcasting).

    Args:
      a, b: int8 arrays of equal shape.
      a_scale, a_zp, b_scale, b_zp, out_scale, out_zp: per-tensor quantization parameters.
      activation: None, ``"relu"`` or ``"relu6"`` (fused output clamp).
      requant: ``"double"`` | ``"single"`` or a precomputed :class:`AddRequant`.

    Returns:
      int8 array of ``a``'s shape.
    """
    a = check_int8("a", a)
    b = check_int8("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if isinstance(requant, AddRequant):
        rq = requant
    else:
        rq = add_requant(a_scale, b_scale, out_scale, requant)
    da = a.astype(jnp.int32) - check_zero_point("a_zp", a_zp)
    db = b.astype(jnp.int32) - check_zero_point("b_zp", b_zp)
    zp = check_zero_point("out_zp", out_zp)
    lo, hi = activation_range(activation, out_scale, out_zp, rq.mode)

    def scaled(d, r: Requant):
        return multiply_by_quantized_multiplier(
            jnp.left_shift(d, rq.left_shift), r.multiplier, r.shift, r.mode
        )

    raw = scaled(da, rq.a) + scaled(db, rq.b)
    y = multiply_by_quantized_multiplier(raw, rq.out.multiplier, rq.out.shift, rq.mode) + zp
    return jnp.clip(y, lo, hi).astype(jnp.int8)
