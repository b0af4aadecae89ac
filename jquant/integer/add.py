"""int8 elementwise add of two tensors with different scales (TFLite ``ADD``, ONNX ``QLinearAdd``).

``double`` / ``single`` (TFLite, ``left_shift = 20``): both inputs are brought to a common
scale ``2 max(s_a, s_b) / 2^20`` in int32, summed, and rescaled to the output::

    a' = MBQM((a - a_zp) * 2^20, M_a),   M_a = s_a / (2 max(s_a, s_b))
    b' = MBQM((b - b_zp) * 2^20, M_b),   M_b = s_b / (2 max(s_a, s_b))
    y  = clamp(MBQM(a' + b', M_y) + y_zp),   M_y = 2 max(s_a, s_b) / (2^20 s_y)

with ``MBQM`` = :func:`~jquant.integer.fixed_point.multiply_by_quantized_multiplier` and the
multipliers computed in float64.

``fp32`` (XNNPACK-style float requantization, as ONNX Runtime's ``QLinearAdd``): float32
multipliers ``m_a = s_a / s_y`` and ``m_b = s_b / s_y`` computed host-side in float32, then,
each step rounded to float32::

    y = clamp(round_half_even(float32((a - a_zp) m_a) + float32((b - b_zp) m_b)) + y_zp)

XLA on CPU contracts ``x * y + z`` into an FMA (one rounding instead of two); an
``optimization_barrier`` between the products and their sum keeps the two float32 roundings of
the formula, so the result equals a NumPy float32 evaluation bit for bit.
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

ADD_MODES = ("double", "single", "fp32")
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
    """:class:`AddRequant` from the scales, host-side: float64 for ``double`` / ``single``
    (TFLite), float32 ``s_a / s_y`` and ``s_b / s_y`` for ``fp32`` (``out`` is then unused: 1)."""
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
    if mode == "fp32":
        one = requant_from_multiplier(np.float32(1.0), mode)
        return AddRequant(
            requant_from_multiplier(sa / sy, mode), requant_from_multiplier(sb / sy, mode), one, 0
        )
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
      requant: ``"double"`` | ``"single"`` | ``"fp32"`` or a precomputed :class:`AddRequant`.

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

    if rq.mode == "fp32":
        pa = da.astype(jnp.float32) * jnp.asarray(rq.a.multiplier, jnp.float32)
        pb = db.astype(jnp.float32) * jnp.asarray(rq.b.multiplier, jnp.float32)
        pa, pb = jax.lax.optimization_barrier((pa, pb))  # no FMA: round each product
        y = jnp.clip(pa + pb, (lo - zp).astype(jnp.float32), (hi - zp).astype(jnp.float32))
        return (jnp.round(y).astype(jnp.int32) + zp).astype(jnp.int8)

    def scaled(d, r: Requant):
        return multiply_by_quantized_multiplier(
            jnp.left_shift(d, rq.left_shift), r.multiplier, r.shift, r.mode
        )

    raw = scaled(da, rq.a) + scaled(db, rq.b)
    y = multiply_by_quantized_multiplier(raw, rq.out.multiplier, rq.out.shift, rq.mode) + zp
    return jnp.clip(y, lo, hi).astype(jnp.int8)
