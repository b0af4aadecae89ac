"""Fixed-point arithmetic of integer-only inference, in int32 only (no ``jax_enable_x64``).

A real multiplier ``M > 0`` is stored as a Q31 significand and a power of two (Jacob et al.
2018, section 2.2; TFLite ``QuantizeMultiplier``)::

    M = M0 * 2^(shift - 31),   M0 in [2^30, 2^31)  (i.e. M0 / 2^31 in [0.5, 1))

and ``x * M`` is computed from int32 ``x`` in one of three named modes:

- ``double`` (gemmlowp; TFLite reference kernels)::

      RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^max(shift, 0), M0),
                          max(-shift, 0))

- ``single`` (``TFLITE_SINGLE_ROUNDING``): ``(x * M0 + 2^(30 - shift)) >> (31 - shift)``,
  one rounding (half up) of the exact 64-bit product.
- ``fp32`` (XNNPACK, ONNX Runtime, PyTorch): ``round_half_even(float32(x) * M)`` with ``M``
  itself a float32.

The 64-bit products of ``double`` / ``single`` are emulated with a (signed high, unsigned low)
pair of 32-bit words, so the kernels run wherever int32 does. Multipliers and shifts broadcast
against ``x`` (per-channel arrays).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "INT32_MIN",
    "INT32_MAX",
    "MULTIPLIER_MODES",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier",
    "fixed_point_product",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
MULTIPLIER_MODES = ("double", "single", "fp32")

# Largest float32 below 2^31: float32 values are clamped here before converting to int32.
_F32_BELOW_2_31 = float(np.nextafter(np.float32(2.0**31), np.float32(0.0)))


def check_mode(mode: str) -> None:
    """Raises ValueError unless ``mode`` is one of :data:`MULTIPLIER_MODES`."""
    if mode not in MULTIPLIER_MODES:
        raise ValueError(f"mode must be one of {MULTIPLIER_MODES}, got {mode!r}")


def quantize_multiplier(m, mode: str = "double") -> tuple[np.ndarray, np.ndarray]:
    """Host-side float64 ``m -> (M0, shift)`` with ``m ~= M0 * 2^(shift - 31)``, as TFLite.

    ``q, shift = frexp(m)`` (``q`` in [0.5, 1)); ``M0 = round_half_away(q * 2^31)``; when that
    rounds up to ``2^31``, ``M0 = 2^30`` and ``shift += 1``; ``m == 0`` or ``shift < -31``
    gives ``(0, 0)``. Mode ``single`` (``TFLITE_SINGLE_ROUNDING``) also caps ``shift > 30`` at
    ``(2^31 - 1, 30)``. Works elementwise on arrays (per-channel multipliers).

    Args:
      m: finite real multiplier(s), a Python float or array (converted to float64).
      mode: ``double`` or ``single`` (``fp32`` keeps a float multiplier and has no ``M0``).

    Returns:
      ``(M0, shift)`` as int32 NumPy arrays of ``m``'s shape.

    >>> quantize_multiplier(0.75)
    (array(1610612736, dtype=int32), array(0, dtype=int32))
    """
    if mode not in ("double", "single"):
        raise ValueError(f"mode must be 'double' or 'single' for quantize_multiplier, got {mode!r}")
    if isinstance(m, jax.core.Tracer):
        raise TypeError("quantize_multiplier runs on the host: m must be concrete, not traced")
    m = np.asarray(m, np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError(f"m must be finite, got {m}")
    q, shift = np.frexp(m)
    q_fixed = np.sign(q) * np.floor(np.abs(q) * 2.0**31 + 0.5)  # exact: |q| * 2^31 < 2^31
    up = q_fixed == 2.0**31
    q_fixed = np.where(up, q_fixed / 2, q_fixed)
    shift = np.where(up, shift + 1, shift)
    tiny = shift < -31
    q_fixed = np.where(tiny, 0.0, q_fixed)
    shift = np.where(tiny, 0, shift)
    if mode == "single":
        big = shift > 30
        q_fixed = np.where(big, 2.0**31 - 1, q_fixed)
        shift = np.where(big, 30, shift)
    return q_fixed.astype(np.int32), shift.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# 64-bit integers as (hi: int32, lo: uint32), value = hi * 2^32 + lo.


def _u32(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _i32(x):
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _mul_wide(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact signed ``a * b`` of two int32 arrays as a 64-bit (hi, lo) pair.

    Unsigned 32x32 -> 64 product from 16-bit halves, then the two's complement correction
    ``hi -= (a < 0) * b + (b < 0) * a`` (mod 2^32).
    """
    a, b = jnp.broadcast_arrays(a, b)
    au, bu = _u32(a), _u32(b)
    mask16 = jnp.uint32(0xFFFF)
    a0, a1 = au & mask16, au >> 16
    b0, b1 = bu & mask16, bu >> 16
    ll, lh, hl, hh = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (ll >> 16) + (lh & mask16) + (hl & mask16)  # < 3 * 2^16: no overflow
    lo = (ll & mask16) | (mid << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    hi = hi - jnp.where(a < 0, bu, jnp.uint32(0)) - jnp.where(b < 0, au, jnp.uint32(0))
    return _i32(hi), lo


def _add_wide(hi, lo, hi2, lo2) -> tuple[jax.Array, jax.Array]:
    """(hi, lo) + (hi2, lo2) modulo 2^64."""
    s = lo + lo2
    carry = (s < lo).astype(jnp.int32)
    return hi + hi2 + carry, s


def _wide(v) -> tuple[jax.Array, jax.Array]:
    """A signed int32 array as a 64-bit pair (sign-extended)."""
    v = jnp.asarray(v, jnp.int32)
    return jnp.where(v < 0, -1, 0).astype(jnp.int32), _u32(v)


def _pow2_wide(n) -> tuple[jax.Array, jax.Array]:
    """``2^n`` for ``0 <= n <= 62`` as a 64-bit pair."""
    n = jnp.asarray(n, jnp.int32)
    lo = jnp.where(n < 32, jnp.left_shift(jnp.uint32(1), _u32(jnp.clip(n, 0, 31))), 0)
    hi = jnp.where(n >= 32, jnp.left_shift(1, jnp.clip(n - 32, 0, 30)), 0)
    return hi.astype(jnp.int32), lo.astype(jnp.uint32)


def _shift_right_wide(hi, lo, n) -> jax.Array:
    """Low 32 bits of the arithmetic shift ``(hi, lo) >> n`` for ``0 <= n <= 63``, as int32."""
    n = jnp.asarray(n, jnp.int32)
    s = _u32(jnp.clip(n, 1, 31))
    small = (lo >> s) | (_u32(hi) << (jnp.uint32(32) - s))
    small = jnp.where(n == 0, lo, small)
    large = jnp.right_shift(hi, jnp.clip(n - 32, 0, 31))
    return jnp.where(n >= 32, large, _i32(small))


# ---------------------------------------------------------------------------------------------


def saturating_rounding_doubling_high_mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: the high word of ``2 * a * b``.

    ``(a * b + nudge) / 2^31`` with C truncating division, ``nudge = 2^30`` if ``a * b >= 0``
    else ``1 - 2^30``; the one overflow, ``a == b == INT32_MIN``, saturates to ``INT32_MAX``.
    The product is exact (64-bit, emulated with int32 words).

    >>> int(saturating_rounding_doubling_high_mul(2**30, 2**30))
    536870912
    """
    a = jnp.asarray(a, jnp.int32)
    b = jnp.asarray(b, jnp.int32)
    hi, lo = _mul_wide(a, b)
    negative = hi < 0
    nudge = jnp.where(negative, 1 - 2**30, 2**30)
    hi, lo = _add_wide(hi, lo, *_wide(nudge))
    # Truncating division by 2^31 = arithmetic shift after adding 2^31 - 1 to negatives.
    hi, lo = _add_wide(hi, lo, *_wide(jnp.where(hi < 0, INT32_MAX, 0)))
    out = _shift_right_wide(hi, lo, 31)
    overflow = (a == b) & (a == INT32_MIN)
    return jnp.where(overflow, INT32_MAX, out)


def rounding_divide_by_pot(x: jax.Array, exponent: jax.Array | int) -> jax.Array:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero.

    ``(x >> e) + (r > t)`` with ``r = x & (2^e - 1)`` and ``t = (2^e - 1) >> 1 + (x < 0)``;
    ``0 <= exponent <= 31``. Jacob et al. (2018): ``rounding_divide_by_pot(-12, 3) == -2``.

    >>> int(rounding_divide_by_pot(-12, 3)), int(rounding_divide_by_pot(12, 3))
    (-2, 2)
    """
    x = jnp.asarray(x, jnp.int32)
    _check_range("exponent", exponent, 0, 31)
    e = jnp.asarray(exponent, jnp.int32)
    mask = _i32(jnp.left_shift(jnp.uint32(1), _u32(e)) - jnp.uint32(1))
    remainder = x & mask
    threshold = jnp.right_shift(mask, 1) + (x < 0).astype(jnp.int32)
    return jnp.right_shift(x, e) + (remainder > threshold).astype(jnp.int32)


def multiply_by_quantized_multiplier(
    x: jax.Array, multiplier: jax.Array, shift: jax.Array | int = 0, mode: str = "double"
) -> jax.Array:
    """``x * M`` for int32 ``x`` in a named mode (TFLite ``MultiplyByQuantizedMultiplier``).

    - ``double``: ``RDBPOT(SRDHM(x * 2^max(shift, 0), M0), max(-shift, 0))``, the left shift
      wrapping in int32 as in C; ``-31 <= shift <= 31``.
    - ``single``: ``(x * M0 + 2^(30 - shift)) >> (31 - shift)`` on the exact 64-bit product,
      the low 32 bits kept; ``M0 >= 0``, ``-31 <= shift <= 30``.
    - ``fp32``: ``round_half_even(float32(x) * multiplier)`` with a float32 ``multiplier``
      (``shift`` unused), saturated to the int32 range.

    Args:
      x: int32 accumulator(s).
      multiplier: ``M0`` (int32, from :func:`quantize_multiplier`) or, for ``fp32``, the
        float32 multiplier; broadcasts against ``x`` (per-channel).
      shift: the exponent from :func:`quantize_multiplier`, broadcasting likewise.
      mode: ``double`` | ``single`` | ``fp32``.

    Returns:
      int32 array.
    """
    check_mode(mode)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"x must be an integer array, got dtype {x.dtype}")
    x = x.astype(jnp.int32)
    if mode == "fp32":
        y = x.astype(jnp.float32) * jnp.asarray(multiplier, jnp.float32)
        return jnp.round(jnp.clip(y, float(INT32_MIN), _F32_BELOW_2_31)).astype(jnp.int32)
    m0 = jnp.asarray(multiplier)
    if not jnp.issubdtype(m0.dtype, jnp.integer):
        raise TypeError(f"multiplier must be an int32 M0 in mode {mode!r}, got dtype {m0.dtype}")
    m0 = m0.astype(jnp.int32)
    _check_range("shift", shift, -31, 31 if mode == "double" else 30)
    shift = jnp.asarray(shift, jnp.int32)
    if mode == "double":
        left = jnp.maximum(shift, 0)
        right = jnp.maximum(-shift, 0)
        return rounding_divide_by_pot(
            saturating_rounding_doubling_high_mul(jnp.left_shift(x, left), m0), right
        )
    _check_range("multiplier", multiplier, 0, INT32_MAX)
    total = 31 - shift
    hi, lo = _add_wide(*_mul_wide(x, m0), *_pow2_wide(total - 1))
    return _shift_right_wide(hi, lo, total)


def fixed_point_product(a: float, b: float, frac_bits: int) -> float:
    """``a * b`` computed on ``frac_bits``-bit fixed point, as in the seed's example.

    ``A = trunc(a * 2^f)``, ``B = trunc(b * 2^f)``, result ``A * B / 2^(2 f)``: truncation
    loses up to ``2^-f`` per factor, so the error against ``a * b`` grows as ``f`` shrinks.
    ``a = 0.29, b = 1.04``: 0.30157... (f = 15), 0.300354... (f = 10), 0.2900390625 (f = 5).

    >>> fixed_point_product(0.29, 1.04, 5)
    0.2900390625
    """
    if not isinstance(frac_bits, int) or isinstance(frac_bits, bool) or not 0 <= frac_bits <= 30:
        raise ValueError(f"frac_bits must be an int in [0, 30], got {frac_bits!r}")
    scale = 1 << frac_bits
    ia, ib = math.trunc(a * scale), math.trunc(b * scale)
    return (ia * ib) / (scale * scale)


def _check_range(name: str, v, lo: int, hi: int) -> None:
    """ValueError when concrete ``v`` has values outside ``[lo, hi]``."""
    if isinstance(v, jax.core.Tracer):
        return
    arr = np.asarray(v)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(
            f"{name} must be in [{lo}, {hi}], got values in [{arr.min()}, {arr.max()}]"
        )
