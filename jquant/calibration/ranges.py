"""One-shot range estimators: ``(rmin, rmax)`` from an array, a format and a granularity.

Each returns float32 ``(rmin, rmax)`` of the keepdims statistic shape (scalars per tensor) for
:func:`jquant.qparams_from_range`. Non-finite values in ``x`` are ignored; a group with no
finite value gets ``[0, 0]`` (a finite scale). All are jit-able in ``x``; ``mse``, ``kl`` and
``aciq`` also accept an :class:`~jquant.IntFormat` with traced ``bits`` (vmap over widths).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jquant.calibration import histograms
from jquant.calibration.grouping import (
    Axis,
    as_groups,
    check_data,
    check_format,
    check_int_format,
    finite_min_max,
    kept_axes,
    or_zero,
    stat_shape,
)
from jquant.calibration.search import check_search, mse_clip_factor
from jquant.formats import MAX_BITS, MIN_BITS, Format

__all__ = [
    "minmax",
    "absmax",
    "percentile",
    "mse",
    "kl",
    "aciq",
    "aciq_clip",
    "aciq_mse",
    "ACIQ_PRIORS",
]

Range = tuple[jax.Array, jax.Array]
ACIQ_PRIORS = ("gaussian", "laplace")


def _jit(*static: str):
    return functools.partial(jax.jit, static_argnames=static)


@_jit("kept")
def _minmax(x, kept: tuple[int, ...]) -> Range:
    lo, hi = finite_min_max(x.astype(jnp.float32), kept)
    return or_zero(lo), or_zero(hi)


def minmax(x: jax.Array, axis: Axis = None) -> Range:
    """``(min x, max x)`` over the axes not in ``axis``.

    >>> minmax(jnp.array([-1.0, 3.0, jnp.nan]))
    (Array(-1., dtype=float32), Array(3., dtype=float32))
    """
    x = check_data(x)
    return _minmax(x, kept_axes(axis, x.ndim))


@_jit("kept")
def _absmax(x, kept: tuple[int, ...]) -> Range:
    lo, hi = _minmax(x, kept)
    a = jnp.maximum(-lo, hi)
    return -a, a


def absmax(x: jax.Array, axis: Axis = None) -> Range:
    """``(-a, a)`` with ``a = max |x|`` over the axes not in ``axis``."""
    x = check_data(x)
    return _absmax(x, kept_axes(axis, x.ndim))


def check_percentile(p, symmetric: bool) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 < p <= 100:
        raise ValueError(f"percentile must be a number in (0, 100], got {p!r}")
    if not symmetric and p < 50:
        raise ValueError(f"percentile must be in [50, 100] for a two-sided range, got {p!r}")
    return float(p)


def percentile(x: jax.Array, p: float = 99.99, *, axis: Axis = None, symmetric: bool = False):
    """Percentile clipping (linear interpolation between order statistics, as ``np.percentile``).

    Two-sided: ``(P_{100 - p}(x), P_p(x))``; symmetric: ``(-a, a)`` with ``a = P_p(|x|)``.
    ``p = 100`` is :func:`minmax` / :func:`absmax`.
    """
    p = check_percentile(p, symmetric)
    x = check_data(x)
    return _percentile(x, kept_axes(axis, x.ndim), p, symmetric)


@_jit("kept", "p", "symmetric")
def _percentile(x, kept: tuple[int, ...], p: float, symmetric: bool) -> Range:
    x = x.astype(jnp.float32)
    reduce = tuple(i for i in range(x.ndim) if i not in kept)
    xs = jnp.where(jnp.isfinite(x), x, jnp.nan)

    def pct(v, q):
        return or_zero(jnp.nanpercentile(v, q, axis=reduce, keepdims=bool(kept)))

    if symmetric:
        a = pct(jnp.abs(xs), p)
        return -a, a
    return pct(xs, 100.0 - p), pct(xs, p)


def _grouped(x: jax.Array, kept: tuple[int, ...], fn, *, sequential: bool = False) -> Range:
    """Applies ``fn(row, finite) -> (lo, hi)`` to each group row; reshapes to keepdims."""
    rows = as_groups(x.astype(jnp.float32), kept)
    finite = jnp.isfinite(rows)
    rows = jnp.where(finite, rows, 0.0)
    if sequential:  # one group at a time: fn's intermediates may be large
        lo, hi = jax.lax.map(lambda a: fn(*a), (rows, finite))
    else:
        lo, hi = jax.vmap(fn)(rows, finite)
    shape = stat_shape(x.shape, kept)
    return lo.reshape(shape), hi.reshape(shape)


def _row_range(row, finite) -> Range:
    lo = jnp.min(jnp.where(finite, row, jnp.inf))
    hi = jnp.max(jnp.where(finite, row, -jnp.inf))
    return jnp.minimum(or_zero(lo), 0.0), jnp.maximum(or_zero(hi), 0.0)


def mse(
    x: jax.Array,
    fmt: Format,
    *,
    axis: Axis = None,
    symmetric: bool = False,
    num_candidates: int = 16,
    num_rounds: int = 4,
) -> Range:
    """The clip range of least quantization MSE for ``fmt``, searched on device.

    ``(alpha* rmin, alpha* rmax)`` with ``[rmin, rmax]`` the min/max range widened to 0 and
    ``alpha* = argmin_alpha mean((x - fake_quant(x; alpha))^2)`` over ``(0, 1]``, the quantizer
    being ``qparams_from_range(alpha rmin, alpha rmax, fmt, symmetric=symmetric)`` with
    round-half-even (so pass the same ``symmetric`` to ``qparams_from_range``). The search is
    ``num_rounds`` grids of ``n = num_candidates`` factors, each around the best of the last
    (final spacing ``(1 / n) (2 / (n - 1))^(num_rounds - 1)``, 1.5e-4 by default). Any format;
    ``fmt.bits`` may be traced:

    >>> widths = IntFormat(bits=jnp.arange(2, 9), narrow=True)
    >>> lo, hi = jax.vmap(lambda f: mse(x, f, symmetric=True))(widths)  # doctest: +SKIP
    """
    check_search(num_candidates, num_rounds)
    check_format(fmt)
    x = check_data(x)
    return _mse(x, fmt, kept_axes(axis, x.ndim), symmetric, num_candidates, num_rounds)


@_jit("kept", "symmetric", "num_candidates", "num_rounds")
def _mse(x, fmt, kept, symmetric, num_candidates, num_rounds) -> Range:
    def one(row, finite):
        lo, hi = _row_range(row, finite)
        alpha = mse_clip_factor(
            row,
            finite.astype(jnp.float32),
            lo,
            hi,
            fmt,
            symmetric=symmetric,
            num_candidates=num_candidates,
            num_rounds=num_rounds,
        )
        return alpha * lo, alpha * hi

    return _grouped(x, kept, one)


def kl_format_levels(fmt: Format, num_bins: int):
    """Checks that KL calibration can serve ``fmt`` with ``num_bins`` bins; returns its levels."""
    fmt = check_int_format(fmt, "kl calibration")
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    levels = histograms.kl_levels(fmt)
    if fmt.is_static and levels > num_bins:
        raise ValueError(
            f"num_bins ({num_bins}) must be at least qmax + 1 = {levels} for kl calibration of "
            f"{fmt}; use more bins or a narrower format"
        )
    return levels


def kl(x: jax.Array, fmt: Format, *, axis: Axis = None, num_bins: int = 2048) -> Range:
    """TensorRT entropy calibration: the threshold ``T`` of least ``KL(P || Q)``.

    Histogram of ``|x|`` (of ``max(x, 0)`` for unsigned formats) with ``num_bins`` bins on
    ``[0, max |x|]``; ``T`` from :func:`jquant.calibration.histograms.kl_threshold` with
    ``qmax + 1`` quantized levels. Returns ``(-T, T)``, or ``(0, T)`` for unsigned formats.
    Needs an IntFormat with ``qmax + 1 <= num_bins``.
    """
    kl_format_levels(fmt, num_bins)
    x = check_data(x)
    return _kl(x, fmt, kept_axes(axis, x.ndim), num_bins)


@_jit("kept", "num_bins")
def _kl(x, fmt, kept, num_bins) -> Range:
    levels = histograms.kl_levels(fmt)

    def one(row, finite):
        amax = jnp.max(jnp.where(finite, jnp.abs(row), 0.0))
        v = jnp.abs(row) if fmt.signed else jnp.maximum(row, 0.0)
        counts = histograms.bin_counts(v, finite.astype(jnp.float32), 0.0, amax, num_bins)
        t = histograms.kl_threshold(counts, amax, levels)
        return (-t if fmt.signed else jnp.zeros_like(t)), t

    return _grouped(x, kept, one, sequential=True)


def _aciq_slope(t: float, bits: int, prior: str) -> float:
    """``d aciq_mse / dt`` in float64, in closed form::

    laplace:   -2 e^{-t}                                          + 2 t / (3 * 4^M)
    gaussian:  2 t erfc(t / sqrt 2) - 2 sqrt(2 / pi) e^{-t^2/2}   + 2 t / (3 * 4^M)
    """
    rounding = 2.0 * t / (3.0 * 4.0**bits)
    if prior == "laplace":
        return rounding - 2.0 * math.exp(-t)
    tails = 2.0 * t * math.erfc(t / math.sqrt(2.0))
    return rounding + tails - 2.0 * math.sqrt(2.0 / math.pi) * math.exp(-0.5 * t * t)


@functools.cache
def _aciq_clip_table(prior: str) -> np.ndarray:
    """``t*`` for every width in ``[MIN_BITS, MAX_BITS]``: float64 bisection on the sign of
    the slope over ``[0, 40]`` (to float64 resolution), rounded once to float32."""
    table = []
    for bits in range(MIN_BITS, MAX_BITS + 1):
        lo, hi = 0.0, 40.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if _aciq_slope(mid, bits, prior) > 0 else (mid, hi)
        table.append((lo + hi) / 2)
    return np.asarray(table, np.float32)


def aciq_clip(bits, prior: str = "gaussian") -> jax.Array:
    """Banner et al.'s optimal clipping ``alpha* / sigma`` (Gaussian) or ``alpha* / b`` (Laplace).

    Minimizes their analytical MSE (Banner, Nahshan, Soudry 2019, "Post training 4-bit
    quantization of convolutional networks for rapid-deployment", eqs. 5 and 7), in units of
    the spread, for ``M = bits``::

        laplace:   2 e^{-t}                                                + t^2 / (3 * 4^M)
        gaussian:  (t^2 + 1) erfc(t / sqrt 2) - sqrt(2 / pi) t e^{-t^2/2}  + t^2 / (3 * 4^M)

    (clipping noise of both tails plus the uniform noise of ``2^M`` bins of width
    ``2 t / 2^M``). Both are convex: the root of the derivative, found once per prior for
    every integer width in ``[2, 16]`` by float64 bisection (:func:`_aciq_slope`), then looked
    up by ``bits`` (an int or an integer array, possibly traced). So ``t*`` is the same
    float32 number however it is evaluated: alone, vmapped over widths, or sharded over
    devices (a float32 bisection inside the program moved with how the widths were
    batched). The minimizers are 2.8307, 3.8972, 5.0286 (Laplace) and 1.7106, 2.1516, 2.5591
    (Gaussian) at M = 2, 3, 4; the paper prints 2.83, 3.89, 5.03 and 1.71, 2.15, 2.55.
    """
    if prior not in ACIQ_PRIORS:
        raise ValueError(f"prior must be one of {ACIQ_PRIORS}, got {prior!r}")
    dtype = jnp.result_type(bits)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"bits must be an int or an integer array, got {bits!r} ({dtype})")
    if isinstance(bits, numbers.Integral) and not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return _aciq_clip(bits, prior)


def aciq_mse(t, bits, prior: str = "gaussian") -> jax.Array:
    """Banner et al.'s analytical MSE of clipping at ``t`` spreads with ``2^bits`` bins, per
    unit spread squared (the expressions in :func:`aciq_clip`'s docstring)."""
    if prior not in ACIQ_PRIORS:
        raise ValueError(f"prior must be one of {ACIQ_PRIORS}, got {prior!r}")
    rounding = t * t / (3.0 * jnp.exp2(2.0 * jnp.asarray(bits, jnp.float32)))
    if prior == "laplace":
        return 2.0 * jnp.exp(-t) + rounding
    clipping = (t * t + 1.0) * jax.scipy.special.erfc(t / np.sqrt(2.0)) - np.sqrt(
        2.0 / np.pi
    ) * t * jnp.exp(-0.5 * t * t)
    return clipping + rounding


@_jit("prior")
def _aciq_clip(bits, prior: str) -> jax.Array:
    table = jnp.asarray(_aciq_clip_table(prior))
    return table[jnp.clip(jnp.asarray(bits) - MIN_BITS, 0, MAX_BITS - MIN_BITS)]


def aciq(x: jax.Array, fmt: Format, *, prior: str = "gaussian", axis: Axis = None) -> Range:
    """Analytical clipping (ACIQ): ``(mu - t* s, mu + t* s)`` for a Gaussian or Laplace prior.

    ``mu = mean(x)``; the spread ``s`` is the standard deviation (Gaussian) or the mean
    absolute deviation ``b = mean |x - mu|`` (Laplace); ``t* = aciq_clip(fmt.bits, prior)``.
    Needs a signed IntFormat (the analysis assumes a symmetric density).
    """
    if prior not in ACIQ_PRIORS:
        raise ValueError(f"prior must be one of {ACIQ_PRIORS}, got {prior!r}")
    fmt = check_int_format(fmt, "aciq", signed=True)
    x = check_data(x)
    return _aciq(x, fmt, kept_axes(axis, x.ndim), prior)


@_jit("kept", "prior")
def _aciq(x, fmt, kept, prior) -> Range:
    t = _aciq_clip(fmt.bits, prior)

    def one(row, finite):
        w = finite.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(w), 1.0)
        mu = jnp.sum(w * row) / n
        dev = w * (row - mu)
        if prior == "gaussian":
            spread = jnp.sqrt(jnp.sum(dev * dev) / n)
        else:
            spread = jnp.sum(jnp.abs(dev)) / n
        return mu - t * spread, mu + t * spread

    return _grouped(x, kept, one)
