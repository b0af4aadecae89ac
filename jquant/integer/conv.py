"""int8 2-D convolution (TFLite ``CONV_2D`` / ``DEPTHWISE_CONV_2D`` semantics), NHWC x HWIO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jquant.integer.checks import check_int8
from jquant.integer.padding import explicit_padding, pair
from jquant.integer.requant import Requant, linear_epilogue

__all__ = ["conv2d"]


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    x_scale=None,
    x_zp=0,
    w_scale=None,
    out_scale=None,
    out_zp=0,
    strides=1,
    padding="VALID",
    dilation=1,
    groups: int = 1,
    activation: str | None = None,
    requant: str | Requant = "double",
) -> jax.Array:
    """Integer-only conv: ``y = clamp(requant(sum (x - x_zp) w + b) + out_zp)``, int8 out.

    ``acc[n, i, j, o] = sum_{kh, kw, c} (x_pad[n, i s_h + kh d_h, j s_w + kw d_w, c] - x_zp)
    * w[kh, kw, c, o] + b[o]`` accumulated in int32 from int8 x int8 products, then
    requantized with ``M[o] = x_scale * w_scale[o] / out_scale`` (see ``requant.py``).
    Padding holds ``x_zp`` (real 0), as TFLite pads. Grouped conv: ``x`` has ``C = groups * I``
    channels, ``w`` is ``(KH, KW, I, O)`` with ``O`` a multiple of ``groups``; depthwise is
    ``groups = C`` with ``I = 1`` (TFLite's depth multiplier is ``O / C``).

    Args:
      x: int8 ``(N, H, W, C)``.
      w: int8 ``(KH, KW, C / groups, O)`` (HWIO, the JAX / Flax layout).
      b: int32 ``(O,)`` at scale ``x_scale * w_scale`` (None: zeros).
      x_scale, x_zp: input scale and zero point (per tensor).
      w_scale: weight scale, per tensor or ``(O,)``; weight zero point is 0 (symmetric).
      out_scale, out_zp: output scale and zero point (per tensor).
      strides, dilation: int or pair.
      padding: ``"SAME"`` (TFLite / XLA convention), ``"VALID"`` or ``((t, b), (l, r))``.
      groups: feature groups (``lax`` ``feature_group_count``).
      activation: None, ``"relu"`` or ``"relu6"``, fused as an output clamp.
      requant: ``"double"`` | ``"single"`` | ``"fp32"``, or a precomputed ``Requant`` (then
        the scales are unused, except ``out_scale`` for relu6).

    Returns:
      int8 ``(N, H_out, W_out, O)``.
    """
    x = check_int8("x", x)
    w = check_int8("w", w)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"x must be NHWC and w HWIO (both rank 4), got shapes {x.shape} and {w.shape}"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c, o = x.shape[-1], w.shape[-1]
    if c != groups * w.shape[2] or o % groups:
        raise ValueError(
            f"with groups={groups}, x's channels ({c}) must equal groups * w.shape[2] "
            f"({w.shape[2]}) and w's outputs ({o}) must be a multiple of groups"
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
    strides = pair("strides", strides)
    dilation = pair("dilation", dilation)
    pads = explicit_padding(x.shape[1:3], w.shape[:2], strides, dilation, padding)
    x_pad = lax.pad(
        x, epilogue.x_zp.astype(jnp.int8), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))
    )
    acc = lax.conv_general_dilated(
        x_pad,
        w,
        window_strides=strides,
        padding="VALID",
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        preferred_element_type=jnp.int32,
    )
    return epilogue(acc)
