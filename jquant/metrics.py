"""Error metrics between a reference tensor ``x`` and its quantized version ``y``.

All of them are pure, jit- and vmap-able reductions. ``axis=None`` reduces over every element;
an int or tuple keeps the other axes (one value per channel, say). Computation is in float32.

===========  ====================================================  ==========================
metric       formula                                               perfect match
===========  ====================================================  ==========================
mse          mean((x - y)^2)                                       0
rmse         sqrt(mse)                                             0
sqnr_db      10 log10(sum(x^2) / sum((x - y)^2))                   +inf
cosine       sum(x y) / (||x|| ||y||)                              1
max_abs      max|x - y|                                            0
kl           sum p (log p - log q)  (p, q: softmax of logits)      0
===========  ====================================================  ==========================

For a uniform quantizer of step ``s`` the error is close to uniform on ``[-s/2, s/2]``, so
``mse ~ s^2 / 12`` and every extra bit halves ``s``: ``sqnr_db`` rises by
``20 log10(2) = 6.02`` dB per bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["METRICS", "mse", "rmse", "sqnr_db", "cosine", "max_abs", "kl"]

Axis = int | tuple[int, ...] | None


def _pair(x, y, name: str) -> tuple[jax.Array, jax.Array]:
    """Both arguments as float32 arrays of one shape; TypeError/ValueError otherwise."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    for arg, v in (("x", x), ("y", y)):
        if not (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)):
            raise TypeError(f"{name}: {arg} must be a real numeric array, got dtype {v.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"{name}: x and y must have the same shape, got {x.shape} and {y.shape}")
    return x.astype(jnp.float32), y.astype(jnp.float32)


def _check_axis(axis: Axis, ndim: int, name: str) -> None:
    axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int | np.integer) or not -ndim <= a < ndim:
            raise ValueError(
                f"{name}: axis must be None or ints in [{-ndim}, {ndim}), got {axis!r}"
            )


def mse(x: jax.Array, y: jax.Array, axis: Axis = None) -> jax.Array:
    """Mean squared error ``mean((x - y)^2)`` over ``axis``.

    >>> float(mse(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
    2.0
    """
    x, y = _pair(x, y, "mse")
    _check_axis(axis, x.ndim, "mse")
    return jnp.mean(jnp.square(x - y), axis=axis)


def rmse(x: jax.Array, y: jax.Array, axis: Axis = None) -> jax.Array:
    """Root mean squared error ``sqrt(mean((x - y)^2))``."""
    return jnp.sqrt(mse(x, y, axis))


def sqnr_db(x: jax.Array, y: jax.Array, axis: Axis = None) -> jax.Array:
    """Signal-to-quantization-noise ratio ``10 log10(sum(x^2) / sum((x - y)^2))`` in dB.

    ``x`` is the reference signal, ``y`` its quantized version. A zero error gives ``+inf``;
    a zero signal with a nonzero error gives ``-inf``; both zero give NaN (no signal, no noise).

    >>> round(float(sqnr_db(jnp.array([3.0, 4.0]), jnp.array([3.0, 4.5]))), 4)
    20.0
    """
    x, y = _pair(x, y, "sqnr_db")
    _check_axis(axis, x.ndim, "sqnr_db")
    signal = jnp.sum(jnp.square(x), axis=axis)
    noise = jnp.sum(jnp.square(x - y), axis=axis)
    # log10(signal) - log10(noise) keeps the limits (+-inf) without a 0/0 warning path.
    return 10.0 * (jnp.log10(signal) - jnp.log10(noise))


def cosine(x: jax.Array, y: jax.Array, axis: Axis = None) -> jax.Array:
    """Cosine similarity ``sum(x y) / (||x|| ||y||)``; 0 when either vector is all zeros."""
    x, y = _pair(x, y, "cosine")
    _check_axis(axis, x.ndim, "cosine")
    # Dividing by each max|.| first keeps squares of tiny or huge values inside float32.
    x = x / _safe_absmax(x, axis)
    y = y / _safe_absmax(y, axis)
    num = jnp.sum(x * y, axis=axis)
    den = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis)) * jnp.sqrt(jnp.sum(jnp.square(y), axis=axis))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _safe_absmax(x: jax.Array, axis: Axis) -> jax.Array:
    m = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    return jnp.where(m > 0, m, 1.0)


def max_abs(x: jax.Array, y: jax.Array, axis: Axis = None) -> jax.Array:
    """Largest absolute error ``max|x - y|``."""
    x, y = _pair(x, y, "max_abs")
    _check_axis(axis, x.ndim, "max_abs")
    return jnp.max(jnp.abs(x - y), axis=axis)


def kl(p: jax.Array, q: jax.Array, axis: int = -1, *, from_logits: bool = True) -> jax.Array:
    """Kullback-Leibler divergence ``KL(P || Q) = sum_i p_i (log p_i - log q_i)`` along ``axis``.

    Args:
      p: reference (e.g. the float model's logits).
      q: approximation (e.g. the quantized model's logits).
      axis: the class axis; the other axes are kept (one value per example).
      from_logits: True: ``p``, ``q`` are logits (``log_softmax`` is applied); False: they
        are probability distributions along ``axis`` (non-negative; normalised here).

    Returns:
      KL in nats, ``>= 0``; terms with ``p_i = 0`` contribute 0, ``q_i = 0 < p_i`` gives inf.

    >>> round(float(kl(jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75]), from_logits=False)), 6)
    0.143841
    """
    p, q = _pair(p, q, "kl")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -p.ndim <= axis < max(p.ndim, 1):
        raise ValueError(f"kl: axis must be an int in [{-p.ndim}, {p.ndim}), got {axis!r}")
    if from_logits:
        log_p = jax.nn.log_softmax(p, axis=axis)
        log_q = jax.nn.log_softmax(q, axis=axis)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)
    p = p / jnp.sum(p, axis=axis, keepdims=True)
    q = q / jnp.sum(q, axis=axis, keepdims=True)
    safe_p = jnp.where(p > 0, p, 1.0)
    terms = jnp.where(p > 0, p * (jnp.log(safe_p) - jnp.log(q)), 0.0)
    return jnp.sum(terms, axis=axis)


METRICS = {
    "mse": mse,
    "rmse": rmse,
    "sqnr_db": sqnr_db,
    "cosine": cosine,
    "max_abs": max_abs,
}
"""The elementwise-error metrics ``f(x, y, axis=None)`` that sweeps report, by name."""
