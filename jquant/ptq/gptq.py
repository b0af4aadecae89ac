"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, arXiv:2210.17323), Algorithm 1.

GPTQ quantizes a linear layer's weights one input at a time, minimising the layer's output
error ``||X W - X W_q||^2`` on calibration inputs ``X``: after rounding input ``j``'s weights,
it moves the error onto the inputs not yet quantized through the inverse Hessian
``H^-1``, ``H = 2 X^T X``. In the paper's notation (``W`` is ``(out, in)``, columns are
inputs; our Flax kernels are its transpose)::

    H <- H + damp * mean(diag H) * I                  # dampening
    U <- Cholesky(H^-1)^T                             # upper: H^-1 = U^T U
    for each block of B columns i .. i+B-1:           # lazy batch updates
        for j in the block:
            Q[:, j] <- quant(W[:, j])
            E[:, j-i] <- (W[:, j] - Q[:, j]) / U[j, j]
            W[:, j:i+B] <- W[:, j:i+B] - E[:, j-i] U[j, j:i+B]
        W[:, i+B:] <- W[:, i+B:] - E U[i:i+B, i+B:]

Choices as in the paper's code (``gptq.py`` of IST-DASLab/gptq):

- dead inputs (``H_jj = 0``: an input that is always 0) get ``H_jj = 1`` and their weights
  zeroed, so that ``H`` stays invertible;
- ``act_order``: inputs are quantized in order of decreasing ``H_jj``;
- per-channel ranges come from the whole (dead-zeroed) ``W`` before any update; with groups
  and without ``act_order``, a group's range is taken from its weights as updated when the
  algorithm reaches the group's first input; with groups and ``act_order``, every group's range
  is taken before any update (the code's ``static_groups``), so that the groups stay contiguous
  input blocks of the original order whatever order the inputs are quantized in.

A group must lie in one block: the block is rounded up to a multiple of ``group_size``
(exact arithmetic does not depend on the block; lazy batching only changes memory traffic).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import Format
from jquant.ptq.rtn import Quantized, check_group_size, check_kernel
from jquant.quant import QParams, fake_quant_forward, qparams_from_range

__all__ = ["gptq", "gptq_from_hessian", "hessian"]

HIGHEST = jax.lax.Precision.HIGHEST


def hessian(x: jax.Array) -> jax.Array:
    """``H = 2 X^T X`` of calibration inputs ``x`` ``(n, in)`` (float32, full precision)."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim != 2:
        raise ValueError(f"x must be a 2-D float array (n, in), got {getattr(x, 'shape', x)!r}")
    x = jnp.asarray(x, jnp.float32)
    return 2.0 * jnp.matmul(x.T, x, precision=HIGHEST)


def _ranges(w: jax.Array, fmt: Format, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point over the last axis of ``w`` (min-max)."""
    qp = qparams_from_range(jnp.min(w, -1), jnp.max(w, -1), fmt, symmetric=symmetric)
    return qp.scale, qp.zero_point


def _quantize_columns(w1, u1, fmt, scales, zeros, lo, hi, err1, q1):
    """Columns ``lo..hi-1`` of the block ``w1`` (out, B), one at a time (Algorithm 1's inner
    loop); ``scales[:, j]``, ``zeros[:, j]`` are column j's QParams."""

    def body(j, carry):
        w1, q1, err1 = carry
        col = jax.lax.dynamic_index_in_dim(w1, j, 1, keepdims=False)
        qp = QParams(
            jax.lax.dynamic_index_in_dim(scales, j, 1, keepdims=False),
            jax.lax.dynamic_index_in_dim(zeros, j, 1, keepdims=False),
        )
        q = fake_quant_forward(col, qp, fmt)
        e = (col - q) / u1[j, j]
        # U is upper triangular: row j is 0 left of j, so done columns are left unchanged
        w1 = w1 - e[:, None] * jax.lax.dynamic_index_in_dim(u1, j, 0)
        q1 = jax.lax.dynamic_update_index_in_dim(q1, q, j, 1)
        err1 = jax.lax.dynamic_update_index_in_dim(err1, e, j, 1)
        return w1, q1, err1

    return jax.lax.fori_loop(lo, hi, body, (w1, q1, err1))


@functools.partial(jax.jit, static_argnames=("group_size", "block", "act_order", "symmetric"))
def _gptq(kernel, h, fmt, damp, *, group_size, block, act_order, symmetric):
    w = kernel.T  # (out, in): the paper's layout
    n_out, n_in = w.shape
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[None, :], 0.0, w)
    g = group_size or n_in
    # static ranges (per channel, or per group when act_order), from W before any update
    s_static, z_static = _ranges(w.reshape(n_out, n_in // g, g), fmt, symmetric)  # (out, G)
    group_of = jnp.arange(n_in) // g
    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if act_order else jnp.arange(n_in)
    w, h, group_of = w[:, perm], h[perm][:, perm], group_of[perm]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(n_in, dtype=h.dtype)
    chol = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n_in, dtype=h.dtype))
    u = jnp.linalg.cholesky(h_inv).T
    dynamic = group_size is not None and not act_order
    qs, group_scales, group_zeros = [], [], []
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        q1, err1 = jnp.zeros_like(w1), jnp.zeros_like(w1)
        if dynamic:  # one range per group, from the group's weights as they are now
            for lo in range(0, i2 - i1, g):
                s, z = _ranges(w1[:, lo : lo + g], fmt, symmetric)
                group_scales.append(s)
                group_zeros.append(z)
                cols = (
                    jnp.broadcast_to(s[:, None], (n_out, i2 - i1)),
                    jnp.broadcast_to(z[:, None], (n_out, i2 - i1)),
                )
                w1, q1, err1 = _quantize_columns(w1, u1, fmt, *cols, lo, lo + g, err1, q1)
        else:
            s, z = s_static[:, group_of[i1:i2]], z_static[:, group_of[i1:i2]]
            w1, q1, err1 = _quantize_columns(w1, u1, fmt, s, z, 0, i2 - i1, err1, q1)
        qs.append(q1)
        w = w.at[:, i2:].add(-jnp.matmul(err1, u[i1:i2, i2:], precision=HIGHEST))
    q = jnp.concatenate(qs, axis=1)[:, jnp.argsort(perm)]
    if dynamic:
        scale, zero = jnp.stack(group_scales, 1), jnp.stack(group_zeros, 1)  # (out, G)
    else:
        scale, zero = s_static, z_static
    if group_size is None:
        qp = QParams(scale.T, zero.T)  # (1, out)
    else:
        qp = QParams(scale.T[:, None, :], zero.T[:, None, :])  # (G, 1, out)
    return q.T, qp


def gptq_from_hessian(
    kernel: jax.Array,
    h: jax.Array,
    fmt: Format,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    symmetric: bool = False,
) -> Quantized:
    """:func:`gptq` given the Hessian ``H = 2 X^T X`` ``(in, in)`` instead of ``X`` (e.g.
    summed over calibration batches with :func:`hessian`)."""
    kernel = check_kernel(kernel)
    n_in = kernel.shape[0]
    if not hasattr(h, "shape") or h.shape != (n_in, n_in):
        raise ValueError(
            f"h must be the (in, in) = ({n_in}, {n_in}) Hessian of the kernel's inputs, "
            f"got shape {getattr(h, 'shape', None)}"
        )
    check_group_size(group_size, n_in)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if not isinstance(damp, int | float) or not damp > 0:
        raise ValueError(f"damp must be a number > 0, got {damp!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {act_order!r}")
    if group_size is not None:
        block = -(-block // group_size) * group_size
    q, qp = _gptq(
        kernel,
        jnp.asarray(h, jnp.float32),
        fmt,
        jnp.float32(damp),
        group_size=group_size,
        block=block,
        act_order=act_order,
        symmetric=bool(symmetric),
    )
    if not isinstance(q, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(q))):
        raise ValueError(
            f"the damped Hessian is not positive definite in float32 (damp={damp}); "
            "increase damp or check the calibration inputs for NaN/Inf"
        )
    return Quantized(q, qp)


def gptq(
    kernel: jax.Array,
    x: jax.Array,
    fmt: Format,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    symmetric: bool = False,
) -> Quantized:
    """GPTQ-quantizes ``kernel`` ``(in, out)`` for calibration inputs ``x`` ``(n, in)``.

    Minimises ``||x W - x W_q||^2`` greedily, input by input, with the error of each rounded
    input moved onto the later ones (module docstring: Algorithm 1 of Frantar et al. 2022,
    lazy batch updates of ``block`` inputs, the Cholesky factor of the damped inverse Hessian).

    Args:
      kernel: ``(in, out)`` float weights.
      x: ``(n, in)`` calibration inputs of the layer.
      fmt: the weight format.
      group_size: inputs per group (must divide ``in``), or None for one range per output.
      damp: ``lambda`` in ``H + lambda mean(diag H) I``, > 0.
      block: columns per lazy batch (``B``).
      act_order: quantize inputs in order of decreasing ``H_jj``.
      symmetric: symmetric ranges (zero point 0).

    Returns:
      :class:`~jquant.ptq.rtn.Quantized`: the fake-quantized kernel and its QParams, shaped
      as :func:`~jquant.ptq.rtn.rtn`'s (``(1, out)`` or ``(in / group_size, 1, out)``).
    """
    kernel = check_kernel(kernel)
    if not hasattr(x, "shape") or x.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(
            f"x must be the layer's inputs (n, in) with in = {kernel.shape[0]} (the kernel's "
            f"first dimension), got shape {getattr(x, 'shape', None)}"
        )
    return gptq_from_hessian(
        kernel,
        hessian(x),
        fmt,
        group_size=group_size,
        damp=damp,
        block=block,
        act_order=act_order,
        symmetric=symmetric,
    )
