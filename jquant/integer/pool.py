"""int8 pooling with TFLite semantics (``AVERAGE_POOL_2D``, ``MAX_POOL_2D``), NHWC.

Pooling keeps the input scale and zero point. Average pool sums the raw int8 codes over the
``n`` valid (unpadded) elements of each window and divides rounding half away from zero::

    y = clamp((acc > 0 ? acc + n / 2 : acc - n / 2) / n)     (C truncating division)

Max pool takes the maximum over the valid elements. Both then clamp to the fused
activation's range (relu / relu6 on the input grid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.integer.checks import check_int8
from jquant.integer.padding import explicit_padding, pair
from jquant.integer.requant import activation_range

__all__ = ["avg_pool", "max_pool", "global_avg_pool", "rounded_average"]


def _valid_counts(n: int, window: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
    """Number of unpadded input positions in each output window along one axis."""
    out = (n + pad[0] + pad[1] - window) // stride + 1
    start = np.arange(out) * stride - pad[0]
    return np.clip(start + window, 0, n) - np.clip(start, 0, n)


def _prepare(x, window, strides, padding):
    x = check_int8("x", x)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (rank 4), got shape {x.shape}")
    window = pair("window", window)
    strides = window if strides is None else pair("strides", strides)
    pads = explicit_padding(x.shape[1:3], window, strides, (1, 1), padding)
    for axis, (n, k, p) in enumerate(zip(x.shape[1:3], window, pads, strict=True)):
        if n + p[0] + p[1] < k:
            raise ValueError(f"window {window} is larger than the padded input along axis {axis}")
    return x, window, strides, pads


def rounded_average(acc: jax.Array, n: jax.Array) -> jax.Array:
    """TFLite's int8 average of a window sum: ``(acc + sign(acc) * (n / 2)) / n`` in C integer
    arithmetic (truncating division), i.e. ``acc / n`` rounded half away from zero."""
    return lax.div(jnp.where(acc > 0, acc + n // 2, acc - n // 2), n)  # lax.div truncates


def _clamp(y, activation, x_scale, x_zp, mode):
    lo, hi = activation_range(activation, x_scale, x_zp, mode)
    return jnp.clip(y, lo, hi).astype(jnp.int8)


def avg_pool(
    x: jax.Array,
    window,
    strides=None,
    padding="VALID",
    *,
    x_scale=None,
    x_zp=0,
    activation: str | None = None,
    mode: str = "double",
) -> jax.Array:
    """TFLite int8 average pool: rounded mean of the valid codes, same scale / zero point.

    Args:
      x: int8 ``(N, H, W, C)``.
      window: int or pair (pool size).
      strides: int or pair; None means ``window`` (Keras' default).
      padding: ``"SAME"``, ``"VALID"`` or ``((t, b), (l, r))``; padded elements are not counted.
      x_scale, x_zp: input (= output) scale and zero point, needed by ``activation`` only.
      activation: None, ``"relu"`` or ``"relu6"``.
      mode: rounding of relu6's bound (see ``activation_range``).

    Returns:
      int8 ``(N, H_out, W_out, C)``.
    """
    x, window, strides, pads = _prepare(x, window, strides, padding)
    acc = lax.reduce_window(
        x.astype(jnp.int32),
        jnp.int32(0),
        lax.add,
        (1, *window, 1),
        (1, *strides, 1),
        ((0, 0), *pads, (0, 0)),
    )
    rows, cols = (
        _valid_counts(n, k, s, p)
        for n, k, s, p in zip(x.shape[1:3], window, strides, pads, strict=True)
    )
    n = jnp.broadcast_to(jnp.asarray(np.outer(rows, cols)[:, :, None], jnp.int32), acc.shape)
    y = rounded_average(acc, n)
    return _clamp(y, activation, x_scale, x_zp, mode)


def max_pool(
    x: jax.Array,
    window,
    strides=None,
    padding="VALID",
    *,
    x_scale=None,
    x_zp=0,
    activation: str | None = None,
    mode: str = "double",
) -> jax.Array:
    """TFLite int8 max pool: ``max`` over the valid codes of each window; arguments as
    :func:`avg_pool`."""
    x, window, strides, pads = _prepare(x, window, strides, padding)
    y = lax.reduce_window(
        x,
        jnp.int8(jnp.iinfo(jnp.int8).min),
        lax.max,
        (1, *window, 1),
        (1, *strides, 1),
        ((0, 0), *pads, (0, 0)),
    )
    return _clamp(y, activation, x_scale, x_zp, mode)


def global_avg_pool(
    x: jax.Array,
    *,
    x_scale=None,
    x_zp=0,
    activation: str | None = None,
    mode: str = "double",
    keepdims: bool = False,
) -> jax.Array:
    """:func:`avg_pool` over the whole ``H x W`` plane (TFLite ``AVERAGE_POOL_2D`` with the
    full window, not TFLite ``MEAN``): int8 ``(N, C)``, or ``(N, 1, 1, C)`` if ``keepdims``."""
    x = check_int8("x", x)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (rank 4), got shape {x.shape}")
    y = avg_pool(
        x,
        x.shape[1:3],
        padding="VALID",
        x_scale=x_scale,
        x_zp=x_zp,
        activation=activation,
        mode=mode,
    )
    return y if keepdims else y[:, 0, 0, :]
