"""Non-uniform (codebook) quantization and the Lloyd-Max quantizer.

A codebook quantizer with sorted levels ``y_1 < ... < y_N`` maps ``x`` to its nearest level;
the decision thresholds are the midpoints ``t_i = (y_i + y_{i+1}) / 2``. Its mean squared
error on a distribution ``p`` is::

    D = sum_i integral_{t_{i-1}}^{t_i} (x - y_i)^2 p(x) dx
      = sum_i [S_i - 2 y_i M_i + y_i^2 P_i]

with ``P_i, M_i, S_i`` the probability, first and second moment of the cell
``[t_{i-1}, t_i)`` (``t_0 = -inf``, ``t_N = +inf``). Lloyd (1957/1982) and Max (1960) minimise
``D`` by alternating ``t_i = (y_i + y_{i+1}) / 2`` and ``y_i = M_i / P_i`` (each level the
centroid of its cell).

Distributions are given either by samples (an empirical distribution: moments are cumulative
sums over the sorted samples) or in closed form (``"gaussian"`` with unit variance,
``"laplace"`` with unit variance), in which case the error is exact, not sampled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

__all__ = [
    "Moments",
    "gaussian_moments",
    "laplace_moments",
    "empirical_moments",
    "get_moments",
    "codebook_quantize",
    "codebook_mse",
    "uniform_levels",
    "lloyd_max",
    "optimal_uniform_step",
]


class Moments(NamedTuple):
    """Partial moments of a distribution up to ``t``: ``(P(t), M(t), S(t))``.

    ``P(t) = Pr[x < t]``, ``M(t) = E[x 1(x < t)]``, ``S(t) = E[x^2 1(x < t)]``.
    """

    cdf: Callable[[jax.Array], jax.Array]
    first: Callable[[jax.Array], jax.Array]
    second: Callable[[jax.Array], jax.Array]


def _phi(t):
    return jnp.exp(-0.5 * t * t) / jnp.sqrt(2.0 * jnp.pi)


def gaussian_moments() -> Moments:
    """N(0, 1): ``P = Phi(t)``, ``M = -phi(t)``, ``S = Phi(t) - t phi(t)``."""
    return Moments(
        cdf=ndtr,
        first=lambda t: jnp.where(jnp.isinf(t), 0.0, -_phi(t)),
        second=lambda t: ndtr(t) - jnp.where(jnp.isinf(t), 0.0, t * _phi(t)),
    )


def laplace_moments(b: float = 2.0**-0.5) -> Moments:
    """Laplace(0, b) (unit variance for ``b = 1/sqrt 2``), closed forms by symmetry.

    For ``t < 0``: ``P = e^{t/b}/2``, ``M = e^{t/b}(t - b)/2``, ``S = e^{t/b}(t^2 - 2bt + 2b^2)/2``;
    for ``t >= 0`` the complements of the mirrored tail.
    """

    def tail(t):  # e^{-|t|/b} / 2, zero at infinity
        return 0.5 * jnp.exp(-jnp.abs(t) / b)

    def cdf(t):
        return jnp.where(t < 0, tail(t), 1.0 - tail(t))

    def first(t):
        a = jnp.where(jnp.isinf(t), 0.0, jnp.abs(t))
        return -tail(t) * (a + b)

    def second(t):
        a = jnp.where(jnp.isinf(t), 0.0, jnp.abs(t))
        upper = tail(t) * (a * a + 2 * b * a + 2 * b * b)
        return jnp.where(t < 0, upper, 2 * b * b - upper)

    return Moments(cdf, first, second)


def empirical_moments(samples: jax.Array) -> Moments:
    """Moments of the empirical distribution of ``samples`` (1/n weight each)."""
    x = jnp.sort(jnp.ravel(jnp.asarray(samples, jnp.float32)))
    if x.size == 0:
        raise ValueError("samples must not be empty")
    n = x.size
    c1 = jnp.concatenate([jnp.zeros(1), jnp.cumsum(x)]) / n
    c2 = jnp.concatenate([jnp.zeros(1), jnp.cumsum(x * x)]) / n

    def idx(t):
        return jnp.searchsorted(x, t, side="left")

    return Moments(lambda t: idx(t) / n, lambda t: c1[idx(t)], lambda t: c2[idx(t)])


def get_moments(distribution) -> Moments:
    """``"gaussian"``, ``"laplace"``, a ``Moments`` or an array of samples."""
    if isinstance(distribution, Moments):
        return distribution
    if isinstance(distribution, str):
        if distribution == "gaussian":
            return gaussian_moments()
        if distribution == "laplace":
            return laplace_moments()
        raise ValueError(
            f"distribution must be 'gaussian', 'laplace', Moments or samples, got {distribution!r}"
        )
    return empirical_moments(distribution)


def _check_levels(levels) -> jax.Array:
    levels = jnp.asarray(levels, jnp.float32)
    if levels.ndim != 1 or levels.shape[0] < 1:
        raise ValueError(f"levels must be a non-empty 1-D array, got shape {levels.shape}")
    return levels


def codebook_quantize(x: jax.Array, levels: jax.Array) -> jax.Array:
    """Nearest level of the sorted codebook ``levels`` for each element of ``x``.

    ``i = #{t_j <= x}`` over the midpoints ``t_j``, so ties go to the upper level.
    NaN stays NaN.
    """
    levels = _check_levels(levels)
    x = jnp.asarray(x)
    thresholds = 0.5 * (levels[1:] + levels[:-1])
    idx = jnp.searchsorted(thresholds, x, side="right")
    return jnp.where(jnp.isnan(x), jnp.nan, levels[idx]).astype(x.dtype)


def codebook_mse(levels: jax.Array, distribution="gaussian") -> jax.Array:
    """``D = sum_i S_i - 2 y_i M_i + y_i^2 P_i`` over the nearest-level cells (see module)."""
    levels = _check_levels(levels)
    m = get_moments(distribution)
    inf = jnp.array([jnp.inf], jnp.float32)
    t = jnp.concatenate([-inf, 0.5 * (levels[1:] + levels[:-1]), inf])
    p, mm, s = (jnp.diff(f(t)) for f in m)
    return jnp.sum(s - 2 * levels * mm + levels * levels * p)


def uniform_levels(n_levels: int, step) -> jax.Array:
    """``N`` levels ``(k - (N - 1)/2) * step``: midtread (a zero level) for odd ``N``,
    midrise (levels at ``(k + 1/2) * step``) for even ``N``."""
    if not isinstance(n_levels, int) or n_levels < 1:
        raise ValueError(f"n_levels must be a positive int, got {n_levels!r}")
    return (jnp.arange(n_levels, dtype=jnp.float32) - 0.5 * (n_levels - 1)) * step


def optimal_uniform_step(
    n_levels: int, distribution="gaussian", *, iters: int = 80
) -> tuple[jax.Array, jax.Array]:
    """Step of the MSE-optimal uniform quantizer with ``N`` levels (Max 1960, Table II).

    Golden-section search of ``codebook_mse(uniform_levels(N, step))`` over the step, which is
    unimodal in the step. Returns ``(step, mse)``. Named distributions compile once per
    ``(n_levels, distribution, iters)``.
    """
    if isinstance(distribution, str):
        return _optimal_uniform_step_named(n_levels, distribution, iters)
    return _optimal_uniform_step(n_levels, get_moments(distribution), iters)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _optimal_uniform_step_named(n_levels: int, name: str, iters: int):
    return _optimal_uniform_step(n_levels, get_moments(name), iters)


def _optimal_uniform_step(n_levels: int, m: Moments, iters: int):

    def loss(step):
        return codebook_mse(uniform_levels(n_levels, step), m)

    g = (jnp.sqrt(5.0) - 1) / 2
    lo, hi = jnp.float32(1e-3), jnp.float32(8.0 / max(n_levels - 1, 1) + 1.0)

    def body(_, ab):
        a, b = ab
        c, d = b - g * (b - a), a + g * (b - a)
        return jax.lax.cond(loss(c) < loss(d), lambda: (a, d), lambda: (c, b))

    a, b = jax.lax.fori_loop(0, iters, body, (lo, hi))
    step = 0.5 * (a + b)
    return step, loss(step)


def lloyd_max(
    n_levels: int, distribution="gaussian", *, iters: int = 300, init=None
) -> tuple[jax.Array, jax.Array]:
    """Lloyd-Max levels for ``N`` cells: alternate midpoint thresholds and centroids.

    Starts from the optimal-ish uniform grid (or ``init``) and runs ``iters`` centroid
    updates under ``lax.fori_loop``. Returns ``(levels, mse)``.
    """
    levels = uniform_levels(n_levels, 4.0 / n_levels) if init is None else _check_levels(init)
    if isinstance(distribution, str):
        return _lloyd_max_named(levels, distribution, iters)
    return _lloyd_max(levels, get_moments(distribution), iters)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lloyd_max_named(levels: jax.Array, name: str, iters: int):
    return _lloyd_max(levels, get_moments(name), iters)


def _lloyd_max(levels: jax.Array, m: Moments, iters: int):
    inf = jnp.array([jnp.inf], jnp.float32)

    def body(_, y):
        t = jnp.concatenate([-inf, 0.5 * (y[1:] + y[:-1]), inf])
        p, mm = jnp.diff(m.cdf(t)), jnp.diff(m.first(t))
        return jnp.where(p > 0, mm / jnp.where(p > 0, p, 1.0), y)

    levels = jax.lax.fori_loop(0, iters, body, levels)
    return levels, codebook_mse(levels, m)
