"""Fake quantization with gradient estimators, each a ``jax.custom_vjp``.

Forward, for every estimator: ``y = scale * Q(x / scale)`` where, in units of the step,
``Q(v) = clip(round(v) + zp, qmin, qmax) - zp`` (``fake_quant_forward``). Rounding has zero
derivative almost everywhere, so training needs a surrogate gradient. With ``v = x / s`` and
"inside" meaning ``qmin <= v + zp <= qmax`` (before rounding, as in the LSQ paper):

========== ===================== ========================================= =================
estimator  dL/dx                 dL/dscale                                 dL/dzero_point
========== ===================== ========================================= =================
ste        g                     0                                         0
clipped    g * inside            0                                         0
lsq        g * inside            sum(g * (Q(v) - v * inside)) * gs         0
lsq_plus   g * inside            as lsq                                    -s sum(g (1-inside)) gs
pact       g * inside            sum(g * Q(v) * (1 - inside))              0
========== ===================== ========================================= =================

``gs = 1 / sqrt(N * qmax)`` is LSQ's gradient scale (Esser et al. 2019, section 2.2), with
``N`` the number of elements that share one scale. Outside the range ``Q(v)`` is
``qmin - zp`` or ``qmax - zp``, so LSQ's step gradient is ``round(v) - v`` inside and
``-Q_N`` / ``Q_P`` outside (their eq. 3). PACT (Choi et al. 2018) learns the clip value
``alpha = scale * qmax`` (unsigned, ``zp = 0``): ``dL/dalpha = sum_{x >= alpha} g``, which is
the scale gradient above divided by ``qmax``. LSQ+ (Bhalgat et al. 2020) also learns the offset
``beta = -scale * zp``; the forward rounds ``zp`` to keep the integer grid. With
``x_hat = s * clip(round((x - beta) / s), n, p) + beta`` their ``d x_hat / d beta`` is 0 inside
and 1 outside, so ``dL/dbeta = sum g (1 - inside)`` and, through ``zp = -beta / s``,
``dL/dzp = -s sum g (1 - inside)`` (times ``gs``, as the step).

Initialisations (:func:`lsq_init_scale`, :func:`lsq_plus_weight_init_scale`): LSQ sets
``s0 = 2 mean|v| / sqrt(Q_P)`` (Esser et al., sec. 2.1); LSQ+ sets a weight's step to
``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)`` (Bhalgat et al., sec. 3.3) and an
activation's step and offset from its min / max (``s = (max - min) / (2^b - 1)``,
``beta = min``: the affine calibrated range). PACT initialises ``alpha`` from the calibrated
maximum (the paper's constant 10 would not suit standardised inputs). The gradient scale
``gs`` makes a *shared SGD* rate suit weights and steps; under Adam it cancels (Adam
normalises each parameter), so ``jquant.qat.qat_optimizer`` gives learned steps a relative rate.

Sums run over the axes along which ``scale`` / ``zero_point`` broadcast, so per-tensor,
per-channel and per-block parameters all receive gradients of their own shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import BinaryFormat, FloatFormat, Format, IntFormat
from jquant.quant import (
    QParams,
    block_view,
    check_qparams,
    check_rounding,
    fake_quant_forward,
    stochastic_noise,
    unblock,
)

__all__ = [
    "ESTIMATORS",
    "fake_quant",
    "pact_qparams",
    "lsq_init_scale",
    "lsq_plus_weight_init_scale",
]

ESTIMATORS = ("ste", "clipped_ste", "lsq", "lsq_plus", "pact")
_LEARNED = ("lsq", "lsq_plus", "pact")


def _with_bits(spec: Format, bits) -> Format:
    return dataclasses.replace(spec, bits=bits) if isinstance(spec, IntFormat) else spec


def _range(spec: Format, bits):
    """(lo, hi) of ``v + zp`` that is inside the grid, as float arrays."""
    fmt = _with_bits(spec, bits)
    if isinstance(fmt, FloatFormat):
        return -fmt.max, fmt.max
    if isinstance(fmt, BinaryFormat):
        return -1.0, 1.0
    if fmt.midrise:  # levels (q + 1/2) s for q in [qmin, qmax]
        return fmt.qmin + 0.5, fmt.qmax + 0.5
    return fmt.qmin, fmt.qmax


def _forward(static, x, scale, zp, bits, noise):
    spec, rounding = static
    return fake_quant_forward(x, QParams(scale, zp), _with_bits(spec, bits), rounding, noise)


def _residuals(static, x, scale, zp, bits, noise):
    """Forward output plus what every backward rule needs: ``v``, the inside mask, ``Q(v)``."""
    y = _forward(static, x, scale, zp, bits, noise)
    lo, hi = _range(static[0], bits)
    v = x.astype(jnp.float32) / scale
    vz = v + jnp.round(zp)
    inside = ((vz >= lo) & (vz <= hi)).astype(jnp.float32)
    return y, (v, inside, y.astype(jnp.float32) / scale, scale, zp, bits, noise)


def _sum_to(g: jax.Array, like) -> jax.Array:
    """Sums ``g`` over the axes along which ``like`` was broadcast, to ``like``'s shape."""
    shape = jnp.shape(like)
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return jnp.sum(g, axis=axes).reshape(shape).astype(jnp.result_type(like))


def _grad_scale(v, scale, spec: Format, bits) -> jax.Array:
    """LSQ's ``1 / sqrt(N * qmax)``; ``N`` = elements per scale."""
    n = v.size / max(int(np.prod(jnp.shape(scale))), 1)
    qmax = _with_bits(spec, bits).qmax
    return jax.lax.rsqrt(jnp.asarray(n * jnp.maximum(qmax, 1), jnp.float32))


def _no_grads(res):
    _, _, _, scale, zp, bits, noise = res
    zeros = jax.tree_util.tree_map(jnp.zeros_like, (scale, zp, bits, noise))
    return zeros


# --- ste --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ste(static, x, scale, zp, bits, noise):
    return _forward(static, x, scale, zp, bits, noise)


def _ste_fwd(static, x, scale, zp, bits, noise):
    return _residuals(static, x, scale, zp, bits, noise)


def _ste_bwd(static, res, g):
    return (g, *_no_grads(res))


_ste.defvjp(_ste_fwd, _ste_bwd)


# --- clipped_ste ------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _clipped_ste(static, x, scale, zp, bits, noise):
    return _forward(static, x, scale, zp, bits, noise)


def _clipped_ste_bwd(static, res, g):
    inside = res[1]
    return ((g * inside).astype(g.dtype), *_no_grads(res))


_clipped_ste.defvjp(_ste_fwd, _clipped_ste_bwd)


# --- lsq --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsq(static, x, scale, zp, bits, noise):
    return _forward(static, x, scale, zp, bits, noise)


def _lsq_scale_grad(static, res, g):
    v, inside, qv, scale, _, bits, _ = res
    gs = _grad_scale(v, scale, static[0], bits)
    # where, not v * inside: v is +-inf for +-inf inputs, and inf * 0 is NaN
    return _sum_to(g * (qv - jnp.where(inside > 0, v, 0.0)) * gs, scale)


def _lsq_bwd(static, res, g):
    inside = res[1]
    _, zp_zero, bits_zero, noise_zero = _no_grads(res)
    return (
        (g * inside).astype(g.dtype),
        _lsq_scale_grad(static, res, g),
        zp_zero,
        bits_zero,
        noise_zero,
    )


_lsq.defvjp(_ste_fwd, _lsq_bwd)


# --- lsq_plus ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsq_plus(static, x, scale, zp, bits, noise):
    return _forward(static, x, scale, zp, bits, noise)


def _lsq_plus_bwd(static, res, g):
    v, inside, _, scale, zp, bits, _ = res
    _, _, bits_zero, noise_zero = _no_grads(res)
    gs = _grad_scale(v, scale, static[0], bits)
    d_zp = _sum_to(-scale * g * (1.0 - inside) * gs, zp)
    return (
        (g * inside).astype(g.dtype),
        _lsq_scale_grad(static, res, g),
        d_zp,
        bits_zero,
        noise_zero,
    )


_lsq_plus.defvjp(_ste_fwd, _lsq_plus_bwd)


# --- pact -------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(static, x, scale, zp, bits, noise):
    return _forward(static, x, scale, zp, bits, noise)


def _pact_bwd(static, res, g):
    _, inside, qv, scale, _, _, _ = res
    _, zp_zero, bits_zero, noise_zero = _no_grads(res)
    d_scale = _sum_to(g * qv * (1.0 - inside), scale)
    return ((g * inside).astype(g.dtype), d_scale, zp_zero, bits_zero, noise_zero)


_pact.defvjp(_ste_fwd, _pact_bwd)

_IMPLS = {
    "ste": _ste,
    "clipped_ste": _clipped_ste,
    "lsq": _lsq,
    "lsq_plus": _lsq_plus,
    "pact": _pact,
}


def fake_quant(
    x: jax.Array,
    qp: QParams,
    fmt: Format,
    *,
    rounding: str = "nearest_even",
    estimator: str = "ste",
    key: jax.Array | None = None,
) -> jax.Array:
    """``scale * (clip(round(x / scale) + zp, qmin, qmax) - zp)`` with a chosen gradient.

    Args:
      x: float array.
      qp: QParams broadcastable against ``x``, or block-wise (``qp.block_size``: one scale per
        block; learned estimators then learn one step per block, with LSQ's ``N = B`` times
        the broadcast extent); learned estimators send gradients into it.
      fmt: the number format (``IntFormat`` may carry traced ``bits``).
      rounding: one of ``jquant.quant.ROUNDING_MODES``; ``"stochastic"`` needs ``key``.
      estimator: one of ``ESTIMATORS`` (see the module docstring for each backward rule).
      key: PRNG key for stochastic rounding.

    Returns:
      ``x`` rounded to the grid, in ``x``'s float dtype; NaN stays NaN, +-Inf saturate.

    >>> import jquant as jq
    >>> float(fake_quant(jnp.float32(0.3), jq.QParams(0.25), jq.int8))
    0.25
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    check_qparams(x, qp, fmt)
    check_rounding(rounding, key)
    if estimator in _LEARNED and not isinstance(fmt, IntFormat):
        raise ValueError(
            f"estimator {estimator!r} learns an integer grid's step; fmt must be an IntFormat, "
            f"got {type(fmt).__name__} (use 'ste' or 'clipped_ste')"
        )
    if qp.block_size is not None:  # one scale per block: LSQ's N is the block's element count
        xb, qpb = block_view(x, qp)
        yb = fake_quant(xb, qpb, fmt, rounding=rounding, estimator=estimator, key=key)
        return unblock(yb, qp, x.shape)
    noise = stochastic_noise(key, x.shape) if rounding == "stochastic" else None
    scale = jnp.asarray(qp.scale, jnp.float32)
    zp = jnp.asarray(qp.zero_point, jnp.float32)
    if isinstance(fmt, IntFormat):
        spec, bits = dataclasses.replace(fmt, bits=None), jnp.asarray(fmt.bits, jnp.float32)
    else:
        spec, bits = fmt, jnp.zeros((), jnp.float32)
    return _IMPLS[estimator]((spec, rounding), x, scale, zp, bits, noise)


def _reduce_axes(x: jax.Array, axis) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    kept = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(a for a in range(x.ndim) if a not in kept)


def lsq_init_scale(
    x: jax.Array, fmt: IntFormat, *, axis: int | tuple[int, ...] | None = None, zero_point=0.0
) -> jax.Array:
    """LSQ's initial step ``s0 = 2 mean|x| / sqrt(Q_P)`` (Esser et al. 2019, sec. 2.1).

    ``Q_P = qmax - zero_point`` is the number of positive levels (``qmax`` on a symmetric
    grid; ``2^b - 1`` for an affine grid whose zero point is ``qmin``, i.e. unsigned data).
    The mean runs over every axis not in ``axis`` (None: per tensor, a scalar), kept as size 1
    so the result broadcasts against ``x``; a zero mean gives ``tiny``, never 0.

    >>> float(lsq_init_scale(jnp.array([1.0, -3.0]), IntFormat(4)))  # 2 * 2 / sqrt(7)
    1.5118578...
    """
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"fmt must be an IntFormat, got {type(fmt).__name__}")
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    q_p = jnp.maximum(jnp.asarray(fmt.qmax, jnp.float32) - zero_point, 1.0)
    mean = jnp.mean(jnp.abs(x), axis=_reduce_axes(x, axis), keepdims=axis is not None)
    return jnp.maximum(2.0 * mean / jnp.sqrt(q_p), jnp.finfo(jnp.float32).tiny)


def lsq_plus_weight_init_scale(
    w: jax.Array, fmt: IntFormat, *, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """LSQ+'s initial weight step ``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``
    (Bhalgat et al. 2020, sec. 3.3), with ``mu``, ``sigma`` the mean and standard deviation
    over every axis not in ``axis`` (kept as size 1; None: per tensor, a scalar).

    >>> float(lsq_plus_weight_init_scale(jnp.array([1.0, -1.0]), IntFormat(4)))  # 3 / 8
    0.375
    """
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"fmt must be an IntFormat, got {type(fmt).__name__}")
    w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
    red, keep = _reduce_axes(w, axis), axis is not None
    mu, sigma = jnp.mean(w, red, keepdims=keep), jnp.std(w, red, keepdims=keep)
    half = 2.0 ** (jnp.asarray(fmt.bits, jnp.float32) - 1)
    s = jnp.maximum(jnp.abs(mu - 3 * sigma), jnp.abs(mu + 3 * sigma)) / half
    return jnp.maximum(s, jnp.finfo(jnp.float32).tiny)


def pact_qparams(alpha: jax.Array, fmt: IntFormat) -> QParams:
    """QParams of PACT's clip ``[0, alpha]`` on an unsigned grid: ``scale = alpha / qmax``."""
    if not isinstance(fmt, IntFormat) or fmt.signed:
        raise ValueError(f"PACT clips to [0, alpha]: fmt must be an unsigned IntFormat, got {fmt}")
    return QParams(jnp.asarray(alpha, jnp.float32) / fmt.qmax, jnp.zeros((), jnp.float32))
