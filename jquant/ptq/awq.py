"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978, Section 3.2).

Weights of input channels with large activations matter most. AWQ scales each input channel
``j`` of the kernel by ``s_j`` before rounding (and divides the input by ``s_j``, folded into
the previous op), which shrinks those channels' relative rounding error. The scales are
``s = mean_n |x_nj| ^ alpha``, normalised by ``sqrt(max s * min s)``, and ``alpha`` is the
grid point ``0, 1/grid, ..., (grid-1)/grid`` that minimises the output error::

    alpha* = argmin_alpha || x W - (x / s) Q(diag(s) W) ||^2

with ``Q`` round-to-nearest per group (the paper's ``auto_scale``; its weight-clipping search
``auto_clip`` is not included). ``alpha = 0`` gives ``s = 1``, i.e. RTN, so AWQ's error is
never above RTN's on its calibration inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jquant.formats import Format
from jquant.ptq.rtn import check_group_size, check_kernel, rtn
from jquant.ptq.transforms import scale_input
from jquant.quant import QParams

__all__ = ["AWQResult", "awq"]

MIN_SCALE = 1e-4  # the paper's code clamps mean |x| ^ alpha at 1e-4


class AWQResult(NamedTuple):
    """``kernel``: the fake-quantized scaled kernel ``Q(diag(s) W)`` ``(in, out)`` (its inputs
    are ``x / s``); ``qparams`` its QParams; ``scales`` ``s`` ``(in,)`` to fold into the
    previous op; ``alpha`` the exponent chosen; ``error`` its mean squared output error."""

    kernel: jax.Array
    qparams: QParams
    scales: jax.Array
    alpha: jax.Array
    error: jax.Array


def awq(
    kernel: jax.Array,
    x: jax.Array,
    fmt: Format,
    *,
    group_size: int | None,
    grid: int = 20,
    symmetric: bool = False,
) -> AWQResult:
    """AWQ's scale search for one layer (module docstring), then RTN of the scaled kernel.

    Args:
      kernel: ``(in, out)`` float weights.
      x: ``(n, in)`` calibration inputs of the layer.
      fmt: the weight format.
      group_size: inputs per group (dividing ``in``; the paper uses 128), or None for one
        range per output channel.
      grid: number of ``alpha`` values tried, ``alpha = k / grid``, ``k = 0 .. grid-1``.
      symmetric: symmetric ranges (zero point 0).

    Returns:
      :class:`AWQResult`; the error is ``mean((x W - (x / s) kernel)^2)``.
    """
    kernel = check_kernel(kernel)
    if not hasattr(x, "shape") or x.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(
            f"x must be the layer's inputs (n, in) with in = {kernel.shape[0]} (the kernel's "
            f"first dimension), got shape {getattr(x, 'shape', None)}"
        )
    check_group_size(group_size, kernel.shape[0])
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    x = jnp.asarray(x, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.matmul(x, kernel, precision=hi)
    x_mean = jnp.mean(jnp.abs(x), axis=0)

    def scales_for(alpha):
        s = jnp.maximum(x_mean**alpha, MIN_SCALE)
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def error(alpha):
        s = scales_for(alpha)
        q = rtn(scale_input(kernel, s), fmt, group_size=group_size, symmetric=symmetric)
        return jnp.mean((y - jnp.matmul(x / s, q.kernel, precision=hi)) ** 2)

    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    errors = jax.lax.map(error, alphas)
    best = jnp.argmin(errors)
    s = scales_for(alphas[best])
    q = rtn(scale_input(kernel, s), fmt, group_size=group_size, symmetric=symmetric)
    return AWQResult(q.kernel, q.qparams, s, alphas[best], errors[best])
