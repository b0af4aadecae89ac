"""int8 concatenation (TFLite ``CONCATENATION``, ONNX ``QLinearConcat`` with equal QParams).

TFLite's int8 kernel requantizes nothing: every input must have the output's scale and zero
point, and the codes are copied::

    y = concat(x_1, ..., x_k; axis),   s_i = s_y and z_i = z_y for every i

Inputs with other QParams are refused (``ValueError``), as the TFLite runtime refuses them;
a converter gives the inputs of a concatenation one shared quantizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant.integer.checks import check_int8, check_scale, check_zero_point, concrete

__all__ = ["concatenate"]


def concatenate(
    xs: Sequence[jax.Array],
    *,
    scales,
    zero_points,
    out_scale,
    out_zp,
    axis: int,
) -> jax.Array:
    """int8 ``concat(xs, axis)`` with TFLite's int8 semantics (module docstring).

    Args:
      xs: non-empty sequence of int8 arrays, equal shapes except along ``axis``.
      scales, zero_points: per input, its scale and zero point (sequences of ``len(xs)``).
      out_scale, out_zp: the output's; each input's must equal them (when concrete).
      axis: the axis to concatenate along (negative counts from the end).

    Returns:
      int8 array.

    >>> a, b = jnp.array([[1, 2]], jnp.int8), jnp.array([[3]], jnp.int8)
    >>> concatenate([a, b], scales=[0.1, 0.1], zero_points=[0, 0], out_scale=0.1,
    ...             out_zp=0, axis=1).tolist()
    [[1, 2, 3]]
    """
    if isinstance(xs, jax.Array | np.ndarray) or not isinstance(xs, Sequence) or not xs:
        raise TypeError(f"xs must be a non-empty sequence of int8 arrays, got {type(xs).__name__}")
    xs = [check_int8(f"xs[{i}]", x) for i, x in enumerate(xs)]
    for name, v in (("scales", scales), ("zero_points", zero_points)):
        if not isinstance(v, Sequence) or len(v) != len(xs):
            raise ValueError(
                f"{name} must be a sequence of {len(xs)} values (one per input), got {v!r}"
            )
    ndim = xs[0].ndim
    if not isinstance(axis, int | np.integer) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [-{ndim}, {ndim}), got {axis!r}")
    sy = concrete(check_scale("out_scale", out_scale))
    zy = concrete(check_zero_point("out_zp", out_zp))
    for i, (s, z) in enumerate(zip(scales, zero_points, strict=True)):
        si = concrete(check_scale(f"scales[{i}]", s))
        zi = concrete(check_zero_point(f"zero_points[{i}]", z))
        if None in (si, sy) or None in (zi, zy):
            continue
        if np.float32(si) != np.float32(sy) or int(zi) != int(zy):
            raise ValueError(
                f"input {i} has scale {float(si)} and zero point {int(zi)}, the output scale "
                f"{float(sy)} and zero point {int(zy)}: TFLite's int8 CONCATENATION needs every "
                "input quantized as the output (requantize the input first)"
            )
    return jnp.concatenate(xs, axis=int(axis))
