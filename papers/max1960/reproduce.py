"""Max (1960), "Quantizing for minimum distortion": optimum uniform and Lloyd-Max quantizers.

For a unit-variance source and ``N`` levels, the optimum uniform quantizer has the step
``s*`` that minimises ``D(s) = E[(x - Q_s(x))^2]`` over uniform grids (midrise for even ``N``:
levels ``(k + 1/2) s``; midtread for odd ``N``: levels ``k s``), and the Lloyd-Max quantizer
the non-uniform levels that are the centroids of their nearest-neighbour cells.

Three independent routes are compared, for Gaussian and Laplacian sources:

- ``calibrated``: jquant's MSE range calibration (``jquant.calibration.mse``) on a
  "representative data set", the quantiles ``F^-1((i + 1/2) / n)``, then ``qparams_from_range``
  on an ``IntFormat`` (midrise for even ``N = 2^b``, narrow-range symmetric for odd
  ``N = 2^b - 1``) and ``fake_quant``; ``D`` measured by ``jquant.metrics.mse``.
- ``closed_form``: ``jquant.codebook.optimal_uniform_step`` / ``lloyd_max`` on the exact
  partial moments of the density (no sampling).
- ``published``: Max's Tables I and II (Gaussian only).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

import jquant as jq
from jquant import calibration, codebook, metrics
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table

# Max (1960), Table I (Lloyd-Max MSE) and Table II (uniform step, uniform MSE), Gaussian.
PUBLISHED = {
    4: {"uniform_step": 0.9957, "uniform_mse": 0.1188, "lloyd_max_mse": 0.1175},
    8: {"uniform_step": 0.5860, "uniform_mse": 0.03744, "lloyd_max_mse": 0.03454},
    16: {"uniform_step": 0.3352, "uniform_mse": 0.01154, "lloyd_max_mse": 0.009497},
}
DISTRIBUTIONS = ("gaussian", "laplace")
LEVELS = (3, 4, 7, 8, 15, 16, 31, 32)
QUICK_LEVELS = {"gaussian": (4, 8, 16), "laplace": (3, 4)}


def representative_data(distribution: str, n: int) -> np.ndarray:
    """Quantiles ``F^-1((i + 1/2) / n)`` of the unit-variance source (a stratified sample)."""
    u = (np.arange(n) + 0.5) / n
    if distribution == "gaussian":
        return ndtri(u).astype(np.float32)
    b = 2.0**-0.5  # Laplace(0, b) has variance 2 b^2 = 1
    return (-b * np.sign(u - 0.5) * np.log1p(-2.0 * np.abs(u - 0.5))).astype(np.float32)


def grid_format(n_levels: int) -> jq.IntFormat:
    """``N = 2^b`` levels: midrise b-bit grid; ``N = 2^b - 1``: narrow symmetric b-bit grid."""
    for b in range(2, 17):
        if n_levels == 2**b:
            return jq.IntFormat(b, midrise=True)
        if n_levels == 2**b - 1:
            return jq.IntFormat(b, narrow=True)
    raise ValueError(f"n_levels must be 2^b or 2^b - 1, got {n_levels}")


@jax.jit
def _calibrated(x: jax.Array, fmt: jq.IntFormat) -> tuple[jax.Array, jax.Array]:
    """``(step, mse)`` of the uniform grid that jquant's MSE calibration picks for ``x``;
    vmapped over ``fmt.bits``, so one program serves every width of a grid kind."""

    def one(f):
        rmin, rmax = calibration.mse(x, f, symmetric=True)
        qp = jq.qparams_from_range(rmin, rmax, f, symmetric=True)
        return qp.scale, metrics.mse(x, jq.fake_quant(x, qp, f))

    return jax.vmap(one)(fmt)


def calibrated_uniform(x: jax.Array, levels: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """``{N: (step, mse)}`` for every ``N`` in ``levels``, one vmapped call per grid kind."""
    out = {}
    for kind in ("midrise", "narrow"):
        ns = [n for n in levels if getattr(grid_format(n), kind)]
        if not ns:
            continue
        bits = jnp.array([grid_format(n).bits for n in ns])
        steps, mses = _calibrated(x, jq.IntFormat(bits, **{kind: True}))
        out.update({n: (float(s), float(m)) for n, s, m in zip(ns, steps, mses, strict=True)})
    return out


# jit: one compiled program per (N, distribution) instead of op-by-op dispatch.
_uniform_closed_form = jax.jit(codebook.optimal_uniform_step, static_argnums=(0, 1))
_lloyd_max = jax.jit(codebook.lloyd_max, static_argnums=(0, 1), static_argnames="iters")


def rows_for(distribution: str, levels: tuple[int, ...], n_samples: int) -> list[dict]:
    x = jnp.asarray(representative_data(distribution, n_samples))
    calibrated = calibrated_uniform(x, levels)
    rows = []
    for n in levels:
        step_cf, mse_cf = _uniform_closed_form(n, distribution)
        step_cal, mse_cal = calibrated[n]
        _, mse_lm = _lloyd_max(n, distribution, iters=3000)
        pub = PUBLISHED.get(n, {}) if distribution == "gaussian" else {}
        rows.append(
            {
                "distribution": distribution,
                "levels": n,
                "grid": "midrise" if n % 2 == 0 else "midtread",
                "uniform_step_published": pub.get("uniform_step"),
                "uniform_step_closed_form": float(step_cf),
                "uniform_step_calibrated": step_cal,
                "uniform_mse_published": pub.get("uniform_mse"),
                "uniform_mse_closed_form": float(mse_cf),
                "uniform_mse_calibrated": mse_cal,
                "lloyd_max_mse_published": pub.get("lloyd_max_mse"),
                "lloyd_max_mse_closed_form": float(mse_lm),
                "uniform_sqnr_db": float(-10 * np.log10(float(mse_cf))),
                "lloyd_max_sqnr_db": float(-10 * np.log10(float(mse_lm))),
            }
        )
    return rows


def _plot(table: Table):
    def draw(fig):
        for i, dist in enumerate(DISTRIBUTIONS):
            ax = fig.add_subplot(1, 2, i + 1)
            t = table.where(distribution=dist)
            n = t.column("levels")
            ax.loglog(n, t.column("uniform_mse_closed_form"), "o-", label="uniform (closed form)")
            ax.loglog(
                n, t.column("uniform_mse_calibrated"), "x", label="uniform (jquant MSE calib.)"
            )
            ax.loglog(n, t.column("lloyd_max_mse_closed_form"), "s-", label="Lloyd-Max")
            if dist == "gaussian":
                pn = sorted(PUBLISHED)
                ax.loglog(
                    pn,
                    [PUBLISHED[k]["uniform_mse"] for k in pn],
                    "k+",
                    ms=12,
                    label="Max 1960 uniform",
                )
                ax.loglog(
                    pn,
                    [PUBLISHED[k]["lloyd_max_mse"] for k in pn],
                    "k*",
                    label="Max 1960 Lloyd-Max",
                )
            ax.set_xlabel("levels N")
            ax.set_ylabel("MSE (unit variance)")
            ax.set_title(f"{dist} source")
            ax.legend(fontsize=7)

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Computes the table (``QUICK_LEVELS`` and 2^18 samples when ``quick``) and writes it."""
    n_samples = 2**18 if quick else 2**20
    rows = [
        r
        for d in DISTRIBUTIONS
        for r in rows_for(d, QUICK_LEVELS[d] if quick else LEVELS, n_samples)
    ]
    table = Table.from_dicts(rows).with_meta(paper="Max 1960", samples=n_samples)
    save_figure(out_dir, "max1960", _plot(table))
    return write_tables(out_dir, {"max1960": table})


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
