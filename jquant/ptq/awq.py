"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978, Section 3.2).

Weights of input channels with large activations matter most. AWQ scales each input channel
``j`` of the kernel by ``s_j`` before rounding (and divides the input by ``s_j``, folded into
the previous op), which shrinks those channels' relative rounding error. The scales are
``s = mean_n |x_nj| ^ alpha``, normalised by ``sqrt(max s * min s)``, and ``alpha`` is the
grid point ``0, 1/grid, ..., (grid-1)/grid`` that minimises the output error::

    alpha* = argmin_alpha || x W - (x / s) Q(diag(s) W) ||^2

with ``Q`` round-to-nearest per group (the paper's ``auto_scale``). ``alpha = 0`` gives
``s = 1``, i.e. RTN, so AWQ's error is never above RTN's on its calibration inputs.

With ``clip=True``, the weight-clipping search of the paper's code (``auto_clip``) follows on
the scaled kernel ``V = diag(s) W`` and inputs ``x / s``: each group ``g`` of each output
channel ``c`` is clamped to ``[-r m_gc, r m_gc]``, ``m_gc = max |V_gc|``, before RTN, with
``r`` in ``1, 1 - 1/clip_grid, ..., 1 - (k - 1)/clip_grid``, ``k = max_shrink * clip_grid``
(the code's 20 and 0.5: ``r`` from 1 down to 0.55). A smaller range rounds the other weights
more finely at the cost of the clipped ones. The ratio minimises the layer's output error::

    r*_gc = argmin_r mean_n (e_nc + x_ng (Q(V)_gc - Q(clip_r V)_gc))^2

groups visited in order, ``e`` the output error with the groups chosen so far (and ``r = 1``
for the rest). Per output channel (``group_size=None``, one group) that is the code's search
exactly; with several groups the code minimises each group's partial output ``x_g V_gc``
separately, which can raise the whole output's error (cross terms), while this greedy pass
starts at no clipping and never raises it. Unlike the code, every token is used (no
subsample) and the query/key kernels are clipped too.
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
    previous op; ``alpha`` the exponent chosen; ``error`` its mean squared output error;
    ``clip_ratio`` ``r`` per group and output channel, ``(in / group_size, out)`` or
    ``(1, out)`` (all 1 without ``clip``)."""

    kernel: jax.Array
    qparams: QParams
    scales: jax.Array
    alpha: jax.Array
    error: jax.Array
    clip_ratio: jax.Array


def _clip(kernel: jax.Array, ratio: jax.Array, groups: int) -> jax.Array:
    """``clip(V_gc, -r_gc m_gc, r_gc m_gc)``, ``m_gc = max |V_gc|`` over each group's inputs;
    ``ratio`` broadcasts against ``(groups, 1, out)``."""
    v = kernel.reshape(groups, -1, kernel.shape[1])
    m = ratio * jnp.max(jnp.abs(v), axis=1, keepdims=True)
    return jnp.clip(v, -m, m).reshape(kernel.shape)


def _clip_search(kernel, x, fmt, group_size, symmetric, ratios) -> jax.Array:
    """The clip ratio per ``(group, out)`` (module docstring), greedy over groups."""
    hi = jax.lax.Precision.HIGHEST
    groups = 1 if group_size is None else kernel.shape[0] // group_size
    quant = jax.vmap(
        lambda r: rtn(_clip(kernel, r, groups), fmt, group_size=group_size, symmetric=symmetric)
    )
    qs = quant(ratios).kernel.reshape(len(ratios), groups, -1, kernel.shape[1])  # (R, G, g, out)
    xg = jnp.moveaxis(x.reshape(x.shape[0], groups, -1), 1, 0)  # (G, n, g)
    e = jnp.matmul(x, kernel - qs[0].reshape(kernel.shape), precision=hi)  # r = 1: no clip

    def step(e, group):
        x_g, q_g = group  # (n, g), (R, g, out)
        e_r = e + jnp.einsum("ng,rgo->rno", x_g, q_g[0] - q_g, precision=hi)
        best = jnp.argmin(jnp.mean(e_r**2, axis=1), axis=0)  # (out,); ties keep r = 1
        return jnp.take_along_axis(e_r, best[None, None, :], 0)[0], best

    _, best = jax.lax.scan(step, e, (xg, jnp.moveaxis(qs, 1, 0)))
    return ratios[best]  # (G, out)


def awq(
    kernel: jax.Array,
    x: jax.Array,
    fmt: Format,
    *,
    group_size: int | None,
    grid: int = 20,
    symmetric: bool = False,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> AWQResult:
    """AWQ's scale search for one layer (module docstring), then RTN of the scaled kernel
    (clipped first with ``clip``).

    Args:
      kernel: ``(in, out)`` float weights.
      x: ``(n, in)`` calibration inputs of the layer.
      fmt: the weight format.
      group_size: inputs per group (dividing ``in``; the paper uses 128), or None for one
        range per output channel.
      grid: number of ``alpha`` values tried, ``alpha = k / grid``, ``k = 0 .. grid-1``.
      symmetric: symmetric ranges (zero point 0).
      clip: run the clipping search after the scale search (``grid=1``: clipping alone,
        ``s = 1``).
      clip_grid: the ratio step is ``1 / clip_grid``.
      max_shrink: ratios down to ``1 - max_shrink`` (exclusive), in ``(0, 1)``.

    Returns:
      :class:`AWQResult`; the error is ``mean((x W - (x / s) kernel)^2)``.

    >>> import jquant as jq
    >>> w = jnp.array([[1.0, 0.1], [0.2, -0.3], [-0.1, 4.0], [0.3, 0.2]])
    >>> x = jnp.eye(4)
    >>> plain = awq(w, x, jq.int2, group_size=None, grid=1)
    >>> clipped = awq(w, x, jq.int2, group_size=None, grid=1, clip=True)
    >>> bool(clipped.error <= plain.error), clipped.clip_ratio.shape
    (True, (1, 2))
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
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {clip!r}")
    if isinstance(clip_grid, bool) or not isinstance(clip_grid, int) or clip_grid < 2:
        raise ValueError(f"clip_grid must be an int >= 2, got {clip_grid!r}")
    if not isinstance(max_shrink, int | float) or not 0.0 < max_shrink < 1.0:
        raise ValueError(f"max_shrink must be a number in (0, 1), got {max_shrink!r}")
    n_ratios = int(max_shrink * clip_grid)
    if n_ratios < 2:
        raise ValueError(
            f"max_shrink * clip_grid must be >= 2 (ratios besides 1), got {max_shrink} * "
            f"{clip_grid}"
        )
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
    v, xs = scale_input(kernel, s), x / s
    groups = 1 if group_size is None else kernel.shape[0] // group_size
    ratio = jnp.ones((groups, kernel.shape[1]), jnp.float32)
    if clip:
        ratios = 1.0 - jnp.arange(n_ratios, dtype=jnp.float32) / clip_grid
        ratio = _clip_search(v, xs, fmt, group_size, symmetric, ratios)
        v = _clip(v, ratio[:, None, :], groups)
    q = rtn(v, fmt, group_size=group_size, symmetric=symmetric)
    err = jnp.mean((y - jnp.matmul(xs, q.kernel, precision=hi)) ** 2)
    return AWQResult(q.kernel, q.qparams, s, alphas[best], err, ratio)
