"""int8 dense layer (TFLite ``FULLY_CONNECTED`` semantics), ``(..., in) x (in, out)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jquant.integer.checks import check_int8
from jquant.integer.requant import Requant, linear_epilogue

__all__ = ["dense"]


def dense(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    x_scale=None,
    x_zp=0,
    w_scale=None,
    out_scale=None,
    out_zp=0,
    activation: str | None = None,
    requant: str | Requant = "double",
) -> jax.Array:
    """Integer-only dense: ``y = clamp(requant(sum_k (x_k - x_zp) w[k, o] + b[o]) + out_zp)``.

    int8 x int8 products accumulate in int32 (``dot_general`` with
    ``preferred_element_type=int32``); ``M[o] = x_scale * w_scale[o] / out_scale``.
    Arguments as :func:`jquant.integer.conv2d`; ``x`` is int8 ``(..., in)``, ``w`` int8
    ``(in, out)`` (the Flax kernel layout; TFLite stores ``(out, in)``).

    Returns:
      int8 ``(..., out)``.
    """
    x = check_int8("x", x)
    w = check_int8("w", w)
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x must be (..., in) and w (in, out) with matching in, got {x.shape} and {w.shape}"
        )
    epilogue = linear_epilogue(
        w,
        b,
        x_scale=x_scale,
        x_zp=x_zp,
        w_scale=w_scale,
        out_scale=out_scale,
        out_zp=out_zp,
        activation=activation,
        requant=requant,
    )
    acc = lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return epilogue(acc)
