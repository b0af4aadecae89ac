"""Search for the clip range that minimizes the quantization MSE, on device.

The candidate ranges shrink a base range ``[rmin, rmax]`` (containing 0) by one factor::

    alpha* = argmin_{0 < alpha <= 1}  sum_i w_i * (v_i - fq(v_i; alpha))^2
    fq(v; alpha) = fake_quant(v, qparams_from_range(alpha * rmin, alpha * rmax, fmt))

with ``(v_i, w_i)`` the samples and unit weights (one-shot) or bin centres and counts
(histogram). The search is a vectorized grid refined: ``num_candidates`` evenly spaced
factors on ``(0, 1]``, then ``num_rounds - 1`` times the same number of factors between the
neighbours of the best one. Each round is a ``lax.map`` over candidates (memory: one copy of
the data), the rounds a ``lax.scan``; everything is traceable, so ``fmt.bits`` may be traced
and the whole search vmapped over bit widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.calibration.grouping import varying_like
from jquant.formats import Format
from jquant.quant import fake_quant_forward, qparams_from_range


def check_search(num_candidates: int, num_rounds: int) -> None:
    """Validates the grid size (>= 3) and number of refinement rounds (>= 1)."""
    for name, v, low in (("num_candidates", num_candidates, 3), ("num_rounds", num_rounds, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def quantization_sse(values, weights, rmin, rmax, fmt: Format, symmetric: bool) -> jax.Array:
    """``sum w * (v - fake_quant(v))^2`` for the quantizer of range ``[rmin, rmax]``."""
    qp = qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)
    err = values - fake_quant_forward(values, qp, fmt)
    return jnp.sum(weights * err * err)


def mse_clip_factor(
    values: jax.Array,
    weights: jax.Array,
    rmin: jax.Array,
    rmax: jax.Array,
    fmt: Format,
    *,
    symmetric: bool,
    num_candidates: int,
    num_rounds: int,
) -> jax.Array:
    """The factor ``alpha`` in ``(0, 1]`` whose range ``alpha * [rmin, rmax]`` has least SSE.

    ``values`` must be finite (give non-finite samples weight 0 and any finite value).
    Ties go to the smallest factor.
    """
    n = num_candidates

    def sse(alpha):
        return quantization_sse(values, weights, alpha * rmin, alpha * rmax, fmt, symmetric)

    def refine(bounds, _):
        lo, hi = bounds
        alphas = jnp.linspace(lo, hi, n)
        best = alphas[jnp.argmin(jax.lax.map(sse, alphas))]
        step = (hi - lo) / (n - 1)
        return (jnp.maximum(best - step, step / n), jnp.minimum(best + step, 1.0)), best

    # typed like the body's output: per device when the width or data vary over a mesh
    start = varying_like((jnp.float32(1.0 / n), jnp.float32(1.0)), values, weights, rmin, rmax, fmt)
    _, best = jax.lax.scan(refine, start, None, length=num_rounds)
    return best[-1]
