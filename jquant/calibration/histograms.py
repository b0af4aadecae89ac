"""Fixed-width histograms and what they serve: quantiles, TensorRT's KL threshold, re-binning.

Bins are ``[lo + k w, lo + (k + 1) w)`` (the last one closed) with ``w = (hi - lo) / n``; a
value ``v`` falls in bin ``clip(floor((v - lo) / w), 0, n - 1)``. Counts are float32 (exact up
to 2^24 per bin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "bin_counts",
    "rebin",
    "rank_value",
    "quantile",
    "fold",
    "positive_part",
    "kl_divergences",
    "kl_threshold",
    "kl_levels",
]


def bin_counts(values: jax.Array, weights: jax.Array, lo, hi, num_bins: int) -> jax.Array:
    """Weighted counts of ``values`` in ``num_bins`` equal bins on ``[lo, hi]``.

    Values outside go to the end bins (so do all values when ``hi == lo``).
    """
    width = (hi - lo) / num_bins
    safe = jnp.where(width > 0, width, 1.0)
    idx = jnp.clip(jnp.floor((values - lo) / safe), 0, num_bins - 1).astype(jnp.int32)
    return jnp.zeros(num_bins, jnp.float32).at[idx].add(weights)


def rebin(counts: jax.Array, lo, hi, new_lo, new_hi) -> jax.Array:
    """Counts on ``[lo, hi]`` re-distributed onto as many bins on a wider ``[new_lo, new_hi]``.

    Mass is spread uniformly inside each old bin: the new counts are differences of the old
    piecewise-linear CDF at the new edges, ``C(e) = interp(e, old_edges, cumsum)``, so the total
    is kept and each unit of mass moves by less than one old bin width. An old range of zero
    width holds a point mass at ``lo``, which goes to the new bin containing ``lo``.
    """
    n = counts.shape[0]
    cdf = jnp.concatenate([jnp.zeros(1, counts.dtype), jnp.cumsum(counts)])
    old_edges = jnp.linspace(lo, hi, n + 1)
    new_edges = jnp.linspace(new_lo, new_hi, n + 1)
    spread = jnp.diff(jnp.interp(new_edges, old_edges, cdf, left=0.0, right=cdf[-1]))
    point = bin_counts(jnp.reshape(lo, (1,)), cdf[-1:], new_lo, new_hi, n)
    return jnp.where(hi > lo, spread, point)


def rank_value(counts: jax.Array, lo, width, rank) -> jax.Array:
    """Where the ``rank``-th smallest value (1-based, fractional allowed) sits in the histogram.

    Mass is spread evenly inside each bin: with ``j`` the first bin whose cumulative count
    reaches ``rank``, ``v = lo + (j + (rank - C_{j-1}) / counts_j) * width`` lies in bin ``j``,
    hence within one bin width of the true order statistic. ``lo`` for an empty histogram.
    """
    cdf = jnp.cumsum(counts)
    j = jnp.clip(jnp.searchsorted(cdf, rank, side="left"), 0, counts.shape[0] - 1)
    below = cdf[j] - counts[j]
    frac = jnp.clip((rank - below) / jnp.where(counts[j] > 0, counts[j], 1.0), 0.0, 1.0)
    return jnp.where(cdf[-1] > 0, lo + (j + frac) * width, lo)


def quantile(counts: jax.Array, lo, width, q) -> jax.Array:
    """``np.percentile``'s linear quantile read off a histogram.

    With ``N`` values and ``h = (N - 1) q``, NumPy interpolates between the order statistics
    of (0-based) ranks ``floor(h)`` and ``floor(h) + 1``; here both are located by
    :func:`rank_value`, so the result is within one bin width of NumPy's on the same data.
    """
    total = jnp.sum(counts)
    h = jnp.maximum(total - 1.0, 0.0) * q
    base = jnp.floor(h)
    below = rank_value(counts, lo, width, base + 1.0)
    above = rank_value(counts, lo, width, jnp.minimum(base + 2.0, total))
    return below + (h - base) * (above - below)


def fold(counts: jax.Array) -> jax.Array:
    """|v| histogram from a histogram symmetric about 0 with ``2n`` bins: ``n`` bins on [0, a]."""
    n = counts.shape[0] // 2
    return counts[n:] + counts[:n][::-1]


def positive_part(counts: jax.Array) -> jax.Array:
    """max(v, 0) histogram from a histogram symmetric about 0: negatives land in bin 0."""
    n = counts.shape[0] // 2
    return counts[n:].at[0].add(jnp.sum(counts[:n]))


def kl_divergences(counts: jax.Array, levels) -> jax.Array:
    """KL(P_i || Q_i) for every candidate threshold of TensorRT's entropy calibration.

    ``counts`` is a histogram of ``|x|`` with ``n`` bins on ``[0, amax]`` and ``levels`` the
    number of quantized magnitudes (``qmax + 1``: 128 for int8). For ``i = levels .. n``
    (Migacz 2017, "8-bit Inference with TensorRT"):

    - ``P_i = counts[:i]`` with the outliers ``sum(counts[i:])`` added to its last bin;
    - ``Q_i``: bin ``k < i`` belongs to group ``g = floor(k * levels / i)``; each group's
      total of ``counts[:i]`` is spread evenly over its non-zero bins (empty bins stay 0);
    - both normalised, ``KL = sum_{P > 0} p log(p / q)`` (``+inf`` if some ``q = 0 < p``).

    Returns an array of ``n`` divergences for ``i = 1 .. n``; ``+inf`` for ``i < levels``.
    Every candidate is computed at once from prefix sums (``O(n^2)`` work, no loop), which
    keeps ``levels`` traceable.
    """
    n = counts.shape[0]
    levels = jnp.asarray(levels).astype(jnp.int32)
    i = jnp.arange(1, n + 1, dtype=jnp.int32)[:, None]
    k = jnp.arange(n, dtype=jnp.int32)[None, :]
    zero = jnp.zeros(1, jnp.float32)
    csum = jnp.concatenate([zero, jnp.cumsum(counts)])
    cnz = jnp.concatenate([zero, jnp.cumsum((counts > 0).astype(jnp.float32))])
    total = csum[-1]
    inside = k < i
    kept = csum[i[:, 0]]
    p = jnp.where(inside, counts, 0.0) + jnp.where(k == i - 1, (total - kept)[:, None], 0.0)
    group = (k * levels) // i
    start = -((-group * i) // levels)  # ceil(group * i / levels)
    stop = jnp.minimum(-((-(group + 1) * i) // levels), n)
    group_sum = csum[stop] - csum[start]
    group_nz = cnz[stop] - cnz[start]
    q = jnp.where(inside & (counts > 0), group_sum / jnp.maximum(group_nz, 1.0), 0.0)
    pn = p / jnp.where(total > 0, total, 1.0)
    qn = q / jnp.where(kept > 0, kept, 1.0)[:, None]
    terms = jnp.where(pn > 0, pn * jnp.log(pn / qn), 0.0)
    kl = jnp.sum(terms, axis=1)
    valid = (i[:, 0] >= levels) & (kept > 0)
    return jnp.where(valid, kl, jnp.inf)


def kl_threshold(counts: jax.Array, amax, levels) -> jax.Array:
    """TensorRT's threshold ``T = i* * amax / n`` with ``i* = argmin_i KL(P_i || Q_i)``.

    ``T`` is the upper edge of the last bin kept in ``P``; ``i = n`` (no clipping) is a
    candidate. ``T = 0`` for an empty histogram or ``amax = 0``.
    """
    n = counts.shape[0]
    best = jnp.argmin(kl_divergences(counts, levels)) + 1
    t = best.astype(jnp.float32) * (amax / n)
    return jnp.where(jnp.sum(counts) > 0, t, 0.0)


def kl_levels(fmt) -> jax.Array | int:
    """Number of quantized magnitudes for KL calibration: ``qmax + 1`` (128 for int8)."""
    return fmt.qmax + 1
