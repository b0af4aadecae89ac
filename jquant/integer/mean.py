"""int8 mean over axes with a new scale (TFLite ``MEAN``, e.g. Keras GlobalAveragePooling2D).

With ``n`` the number of averaged elements and ``acc = sum (x - x_zp)`` (int32), each mode
computes ``y ~= acc s_x / (n s_y) + y_zp`` as its runtime does:

- ``double`` / ``single`` (LiteRT's reference ``MEAN`` with ``keep_dims=False``): the
  multiplier of ``s_x / s_y`` (float64, :func:`~jquant.integer.quantize_multiplier`) absorbs
  the division by ``n`` host-side, in integers::

      k = min(floor(log2 n), 32, 31 + shift),  M0' = floor(M0 2^k / n),  shift' = shift - k
      y = clamp(MBQM(acc, M0', shift') + y_zp)

  also when input and output share scale and zero point (measured with LiteRT 2.3: older
  TFLite sources take a truncating integer path there, LiteRT's runtime does not).
- ``fp32`` (XNNPACK): a float32 multiplier ``m = float32(float32(s_x / s_y) * float32(1 / n))``
  and ``y = clamp(round_half_even(acc m) + y_zp)`` with the product ``acc m`` exact: XNNPACK's
  float-to-int8 conversion rounds with a fused multiply-add (``fma(acc, m, 1.5 2^23)``) on
  CPUs that have one (x86-64 with FMA3, ARM64), so a product that float32 would round onto a
  tie ``k + 1/2`` is rounded from its exact value (measured with LiteRT 2.3). jquant computes
  it in integers: ``m = M0 2^(shift - 31)`` exactly (``M0`` the 24-bit significand shifted to
  Q31), and round half to even of ``acc M0 2^(shift - 31)`` is TFLite's ``single`` rounding
  (half up) where the value is no tie, else the even one of half up and half down.

``MBQM`` is :func:`~jquant.integer.multiply_by_quantized_multiplier` in the mode's rounding.
LiteRT's ``keep_dims=True`` over H and W runs another kernel (rescale first, then divide
rounding half away from zero); jquant's :func:`mean` always drops the reduced axes and models
``keep_dims=False``, which is what the exporter writes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import int8
from jquant.integer.checks import check_int8, check_scale, check_zero_point, concrete
from jquant.integer.fixed_point import (
    MULTIPLIER_MODES,
    check_mode,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
)
from jquant.integer.requant import Requant

__all__ = ["MeanRequant", "mean_requant", "mean"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["rq"], meta_fields=["count"])
@dataclasses.dataclass(frozen=True)
class MeanRequant:
    """Precomputed constants of :func:`mean` for ``count`` averaged elements.

    ``rq``: the multiplier with the division by ``count`` folded in (``M0'``, ``shift'`` or the
    float32 ``m``; ``M0'`` may be below ``2^30``).
    """

    rq: Requant
    count: int

    @property
    def mode(self) -> str:
        return self.rq.mode


def _concrete_scale(name: str, s) -> np.float32:
    c = concrete(check_scale(name, s))
    if c is None:
        raise TypeError(
            f"{name} must be concrete (not traced): mean's multipliers are computed host-side; "
            "pass a precomputed MeanRequant under jit instead"
        )
    return np.float32(c)


def mean_requant(x_scale, x_zp, out_scale, out_zp, count: int, mode: str = "double") -> MeanRequant:
    """:class:`MeanRequant` of a mean over ``count`` elements in ``mode`` (module docstring),
    host-side; the scales and zero points must be concrete."""
    check_mode(mode)
    if not isinstance(count, int | np.integer) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    count = int(count)
    sx, sy = _concrete_scale("x_scale", x_scale), _concrete_scale("out_scale", out_scale)
    for name, z in (("x_zp", x_zp), ("out_zp", out_zp)):
        check_zero_point(name, z)
    zx, zy = concrete(x_zp), concrete(out_zp)
    if zx is None or zy is None:
        raise TypeError("x_zp and out_zp must be concrete (not traced) to build a MeanRequant")
    if mode == "fp32":
        m = np.float32(np.float32(sx / sy) * np.float32(np.float32(1.0) / np.float32(count)))
        return MeanRequant(Requant(np.asarray(m), np.zeros((), np.int32), mode), count)
    m0, shift = (int(v) for v in quantize_multiplier(np.float64(sx) / np.float64(sy), mode))
    k = max(0, min(count.bit_length() - 1, 32, 31 + shift))
    rq = Requant(np.int32((m0 << k) // count), np.int32(shift - k), mode)
    return MeanRequant(rq, count)


def _exact_round_half_even(acc: jax.Array, m: jax.Array) -> jax.Array:
    """``round_half_even(acc * m)`` of the exact product of int32 ``acc`` and a normal
    float32 ``m > 0`` (module docstring), in int32 arithmetic."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(m, jnp.float32), jnp.int32)
    m0 = jnp.left_shift(jnp.bitwise_or(jnp.bitwise_and(bits, 0x7FFFFF), 0x800000), 7)
    shift = jnp.clip(jnp.right_shift(bits, 23) - 126, -31, 30)  # m = m0 2^(shift - 31)
    up = multiply_by_quantized_multiplier(acc, m0, shift, "single")  # half up
    down = -multiply_by_quantized_multiplier(-acc, m0, shift, "single")  # half down
    return jnp.where(up == down, up, jnp.where(up % 2 == 0, up, down))


def _axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    if not axes or not all(isinstance(a, int | np.integer) and -ndim <= a < ndim for a in axes):
        raise ValueError(
            f"axis must be a non-empty int or tuple of ints in [-{ndim}, {ndim}), got {axis!r}"
        )
    out = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis, got {axis!r}")
    return out


def mean(
    x: jax.Array,
    *,
    x_scale=None,
    x_zp=0,
    out_scale=None,
    out_zp=0,
    axis,
    requant: str | MeanRequant = "double",
) -> jax.Array:
    """int8 ``y ~= mean_axis(s_x (x - x_zp)) / s_y + y_zp`` as TFLite ``MEAN`` computes it
    (module docstring: the exact integer scheme per mode); the reduced axes are dropped.

    Args:
      x: int8 array.
      x_scale, x_zp, out_scale, out_zp: per-tensor quantization parameters (the scales may be
        omitted when ``requant`` is a :class:`MeanRequant`; the zero points may not).
      axis: int or tuple of ints, the axes averaged over (e.g. ``(1, 2)`` for NHWC).
      requant: ``"double"`` | ``"single"`` | ``"fp32"`` or a precomputed :class:`MeanRequant`.

    Returns:
      int8 array of ``x``'s shape without ``axis``.

    >>> x = jnp.array([[1, 2, 4]], jnp.int8)
    >>> mean(x, x_scale=1.0, out_scale=0.5, axis=1).tolist()  # 7/3 / 0.5 = 4.67
    [5]
    """
    x = check_int8("x", x)
    axes = _axes(axis, x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    if isinstance(requant, MeanRequant):
        mr = requant
        if mr.count != count:
            raise ValueError(
                f"requant was built for {mr.count} averaged elements, but axis {axis} of shape "
                f"{x.shape} averages {count}"
            )
    elif requant in MULTIPLIER_MODES:
        mr = mean_requant(x_scale, x_zp, out_scale, out_zp, count, requant)
    else:
        raise ValueError(
            f"requant must be a MeanRequant or one of {MULTIPLIER_MODES}, got {requant!r}"
        )
    zx, zy = check_zero_point("x_zp", x_zp), check_zero_point("out_zp", out_zp)
    total = jnp.sum(x.astype(jnp.int32), axis=axes)
    acc = total - zx * jnp.int32(count)
    if mr.mode == "fp32":
        y = _exact_round_half_even(acc, mr.rq.multiplier) + zy
    else:
        y = multiply_by_quantized_multiplier(acc, mr.rq.multiplier, mr.rq.shift, mr.mode) + zy
    return jnp.clip(y, int8.qmin, int8.qmax).astype(jnp.int8)
