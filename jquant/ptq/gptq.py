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

from jquant.formats import Format
from jquant.ptq.rtn import Quantized, check_group_size, check_kernel
from jquant.quant import QParams, fake_quant_forward, qparams_from_range

__all__ = ["gptq", "gptq_from_hessian", "hessian"]

HIGHEST = jax.lax.Precision.HIGHEST
SEGMENT = 16  # inputs per inner lazy batch (an implementation choice; see _gptq)
SYMMETRIC_BLOCKS = 4  # column blocks of hessian()'s symmetric product (speed only)
SYMMETRIC_MIN_WIDTH = 256  # narrowest column block worth a separate product
TRIANGULAR_LEAF = 128  # _cholesky_and_inverse factors blocks up to this size directly


def hessian(x: jax.Array) -> jax.Array:
    """``H = 2 X^T X`` of calibration inputs ``x`` ``(n, in)`` (float32, full precision).

    ``H`` is symmetric, so for wide layers only its blocks on and above the diagonal are
    multiplied (``H_ab = 2 X_a^T X_b`` for column blocks ``a <= b``, ``H_ba = H_ab^T``): about
    ``(k + 1) / 2k`` of the full product's work for ``k`` blocks, as BLAS's ``syrk`` does."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim != 2:
        raise ValueError(f"x must be a 2-D float array (n, in), got {getattr(x, 'shape', x)!r}")
    return _hessian(jnp.asarray(x, jnp.float32))


@jax.jit
def _hessian(x: jax.Array) -> jax.Array:
    n_in = x.shape[1]
    k = max(1, min(SYMMETRIC_BLOCKS, n_in // SYMMETRIC_MIN_WIDTH))
    edges = [n_in * i // k for i in range(k + 1)]
    cols = [x[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    upper = {(a, b): jnp.matmul(cols[a].T, cols[b], precision=HIGHEST)
             for a in range(k) for b in range(a, k)}  # fmt: skip
    rows = [
        jnp.concatenate([upper[a, b] if b >= a else upper[b, a].T for b in range(k)], axis=1)
        for a in range(k)
    ]
    return 2.0 * jnp.concatenate(rows, axis=0)


def _ranges(w: jax.Array, fmt: Format, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point over axis -2 of ``w`` (min-max over the inputs of a group)."""
    qp = qparams_from_range(jnp.min(w, -2), jnp.max(w, -2), fmt, symmetric=symmetric)
    return qp.scale, qp.zero_point


def _quantize_rows(w1, u1, fmt, scales, zeros):
    """Algorithm 1's inner loop over the inputs of ``w1`` ``(m, out)`` (kernel layout: the
    paper's columns are our rows), one at a time; ``scales[j]``, ``zeros[j]`` are input j's
    QParams ``(out,)``, ``u1`` the ``(m, m)`` block of U. Returns ``(Q1, E1)``."""

    def body(j, carry):
        w1, q1, err1 = carry
        row = jax.lax.dynamic_index_in_dim(w1, j, 0, keepdims=False)
        qp = QParams(
            jax.lax.dynamic_index_in_dim(scales, j, 0, keepdims=False),
            jax.lax.dynamic_index_in_dim(zeros, j, 0, keepdims=False),
        )
        q = fake_quant_forward(row, qp, fmt)
        e = (row - q) / u1[j, j]
        # U is upper triangular: column j of U^T is 0 above j, so done rows stay unchanged
        w1 = w1 - jax.lax.dynamic_index_in_dim(u1, j, 0, keepdims=False)[:, None] * e[None, :]
        q1 = jax.lax.dynamic_update_index_in_dim(q1, q, j, 0)
        err1 = jax.lax.dynamic_update_index_in_dim(err1, e, j, 0)
        return w1, q1, err1

    zeros_like = jnp.zeros_like(w1)
    _, q1, err1 = jax.lax.fori_loop(0, w1.shape[0], body, (w1, zeros_like, zeros_like))
    return q1, err1


def _cholesky_and_inverse(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(K, K^-1)`` for the lower Cholesky factor ``K`` of ``h`` (``h = K K^T``), by halves:
    with ``h = [[A, B^T], [B, C]]``, ``K_11 = chol(A)``, ``K_21 = B K_11^-T``, ``K_22 =
    chol(C - K_21 K_21^T)`` and ``K^-1 = [[K_11^-1, 0], [-K_22^-1 K_21 K_11^-1, K_22^-1]]``,
    recursively down to blocks of ``TRIANGULAR_LEAF`` (LAPACK's Cholesky and a triangular
    solve against the identity there): the work is in matrix products."""
    n = h.shape[0]
    if n <= TRIANGULAR_LEAF:
        k = jnp.linalg.cholesky(h)
        return k, jax.scipy.linalg.solve_triangular(k, jnp.eye(n, dtype=h.dtype), lower=True)
    m = n // 2
    k11, i11 = _cholesky_and_inverse(h[:m, :m])
    k21 = jnp.matmul(h[m:, :m], i11.T, precision=HIGHEST)
    k22, i22 = _cholesky_and_inverse(h[m:, m:] - jnp.matmul(k21, k21.T, precision=HIGHEST))
    i21 = -jnp.matmul(i22, jnp.matmul(k21, i11, precision=HIGHEST), precision=HIGHEST)
    zero = jnp.zeros((m, n - m), h.dtype)
    k = jnp.concatenate([jnp.concatenate([k11, zero], 1), jnp.concatenate([k21, k22], 1)])
    inv = jnp.concatenate([jnp.concatenate([i11, zero], 1), jnp.concatenate([i21, i22], 1)])
    return k, inv


def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    """Upper triangular ``U`` with ``H^-1 = U^T U``, from one Cholesky and its inverse: with
    ``J`` the reversal permutation and ``J H J = K K^T`` (``K`` lower), ``H = R R^T`` for the
    upper ``R = J K J``, so ``H^-1 = R^-T R^-1`` and ``U = R^-1 = J K^-1 J`` (positive
    diagonal, hence the Cholesky factor)."""
    return _cholesky_and_inverse(h[::-1, ::-1])[1][::-1, ::-1]


@functools.partial(jax.jit, static_argnames=("group_size", "block", "act_order", "symmetric"))
def _gptq(kernel, h, fmt, damp, *, group_size, block, act_order, symmetric):
    w = kernel  # (in, out): the paper's W transposed, its columns are our rows
    n_in, n_out = w.shape
    diag = jnp.diagonal(h)
    dead = diag == 0
    idx = jnp.arange(n_in)
    h = h.at[idx, idx].add(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    g = group_size or n_in
    # static ranges (per channel, or per group when act_order), from W before any update
    s_static, z_static = _ranges(w.reshape(n_in // g, g, n_out), fmt, symmetric)  # (G, out)
    group_of = jnp.arange(n_in) // g
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, h, group_of = w[perm], h[perm][:, perm], group_of[perm]
    h = h.at[idx, idx].add(damp * jnp.mean(jnp.diagonal(h)))
    u = _upper_cholesky_of_inverse(h)
    dynamic = group_size is not None and not act_order
    # Within a block, inputs go in segments (each group, or SEGMENT inputs), each segment's
    # errors applied to the rest of the block at once: lazy batches at two levels, the same
    # arithmetic as Algorithm 1 with less memory traffic per input.
    segment = g if dynamic else min(SEGMENT, block)
    qs, group_scales, group_zeros = [], [], []
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = w[i1:i2]
        q1, err1 = [], []
        for lo in range(0, i2 - i1, segment):
            hi = min(lo + segment, i2 - i1)
            a, b = i1 + lo, i1 + hi
            if dynamic:  # one range per group, from the group's weights as they are now
                s, z = _ranges(w1[lo:hi], fmt, symmetric)
                group_scales.append(s)
                group_zeros.append(z)
                s, z = jnp.broadcast_to(s, (hi - lo, n_out)), jnp.broadcast_to(z, (hi - lo, n_out))
            else:
                s, z = s_static[group_of[a:b]], z_static[group_of[a:b]]
            q, e = _quantize_rows(w1[lo:hi], u[a:b, a:b], fmt, s, z)
            q1.append(q)
            err1.append(e)
            w1 = w1.at[hi:].add(-jnp.matmul(u[a:b, b:i2].T, e, precision=HIGHEST))
        qs.extend(q1)
        err1 = jnp.concatenate(err1)
        w = w.at[i2:].add(-jnp.matmul(u[i1:i2, i2:].T, err1, precision=HIGHEST))
    q = jnp.concatenate(qs)
    if act_order:
        q = q[jnp.argsort(perm)]
    if dynamic:
        scale, zero = jnp.stack(group_scales), jnp.stack(group_zeros)  # (G, out)
    else:
        scale, zero = s_static, z_static
    if group_size is None:
        qp = QParams(scale, zero)  # (1, out)
    else:
        qp = QParams(scale[:, None, :], zero[:, None, :])  # (G, 1, out)
    return q, qp, jnp.all(jnp.isfinite(q))


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
    q, qp, finite = _gptq(
        kernel,
        jnp.asarray(h, jnp.float32),
        fmt,
        jnp.float32(damp),
        group_size=group_size,
        block=block,
        act_order=act_order,
        symmetric=bool(symmetric),
    )
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
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
