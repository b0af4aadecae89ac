"""Banner, Nahshan, Soudry (2019), ACIQ: analytical clipping for post-training quantization.

Clipping ``x`` to ``[-alpha, alpha]`` and quantizing into ``2^M`` uniform cells of width
``2 alpha / 2^M`` gives, for a symmetric density (their eqs. 5 and 7, in units of the spread:
``t = alpha / b`` for Laplace(0, b), ``t = alpha / sigma`` for N(0, sigma^2))::

    laplace:   MSE / b^2     = 2 e^{-t}                                             + t^2 / (3 4^M)
    gaussian:  MSE / sigma^2 = (t^2 + 1) erfc(t / sqrt 2) - sqrt(2 / pi) t e^{-t^2/2}
                                                                                    + t^2 / (3 4^M)

(clipping noise of both tails + uniform rounding noise). ACIQ picks the ``t*`` minimising the
model (``jquant.calibration.aciq``); we compare it with the empirical MSE-optimal clip
(``jquant.calibration.mse``) and min-max, on Gaussian (sigma = 1) and Laplace (b = 1) samples,
at M = 2..8 bits, all widths in one vmapped program (``jquant.sweep.map_over_bits``).

The grid is Banner's: ``IntFormat(M, midrise=True)`` (``2^M`` levels, no zero level) whose
cells cover ``[-alpha, alpha]``, i.e. the range ``alpha (1 - 2^-M)`` given to
``qparams_from_range`` (which puts the outer *levels* at the range ends).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp

import jquant as jq
from jquant import calibration, metrics
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table, map_over_bits

BITS = tuple(range(2, 9))
PRIORS = ("gaussian", "laplace")
# Banner et al. 2019, section 4: alpha* = 2.83b, 3.89b, 5.03b (Laplace) and 1.71, 2.15, 2.55
# sigma (Gaussian) for M = 2, 3, 4.
PUBLISHED_CLIP = {
    "laplace": {2: 2.83, 3: 3.89, 4: 5.03},
    "gaussian": {2: 1.71, 3: 2.15, 4: 2.55},
}
METHODS = ("aciq", "mse", "minmax")


def samples(prior: str, n: int, seed: int = 0) -> jax.Array:
    """``n`` i.i.d. samples of N(0, 1) or Laplace(0, 1)."""
    key = jax.random.key(seed)
    if prior == "gaussian":
        return jax.random.normal(key, (n,), jnp.float32)
    return jax.random.laplace(key, (n,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class ClipComparison:
    """At width ``bits`` (traced): each method's clip ``alpha`` (cell edge), the measured MSE
    of Banner's grid clipped there, and the model's MSE at the same ``alpha``."""

    prior: str

    def __call__(self, bits, x):
        fmt = jq.IntFormat(bits, midrise=True)
        full_scale = 1.0 - jnp.exp2(-jnp.asarray(bits, jnp.float32))  # levels -> cell edges
        spread = jnp.std(x) if self.prior == "gaussian" else jnp.mean(jnp.abs(x - jnp.mean(x)))
        aciq_lo, aciq_hi = calibration.aciq(x, fmt, prior=self.prior)
        mse_lo, mse_hi = calibration.mse(x, fmt, symmetric=True)
        alphas = {
            "aciq": 0.5 * (aciq_hi - aciq_lo),  # t* times the spread (the grid stays at 0)
            "mse": jnp.maximum(-mse_lo, mse_hi) / full_scale,
            "minmax": calibration.absmax(x)[1],
        }
        out = {"aciq_t_star": calibration.aciq_clip(bits, self.prior)}
        for name, alpha in alphas.items():
            qp = jq.qparams_from_range(-alpha * full_scale, alpha * full_scale, fmt)
            out[f"{name}_clip"] = alpha / spread
            out[f"{name}_mse"] = metrics.mse(x, jq.fake_quant(x, qp, fmt)) / spread**2
            out[f"{name}_model_mse"] = calibration.aciq_mse(alpha / spread, bits, self.prior)
        return out


def _plot(table: Table):
    def draw(fig):
        for i, prior in enumerate(PRIORS):
            t = table.where(prior=prior)
            b = t.column("bits")
            ax = fig.add_subplot(1, 2, i + 1)
            for m, mark in zip(METHODS, "osx", strict=True):
                ax.semilogy(b, t.column(f"{m}_mse"), mark + "-", label=f"{m} (measured)")
            ax.semilogy(b, t.column("aciq_model_mse"), "k--", label="ACIQ model at alpha*")
            ax.set_xlabel("bits M")
            ax.set_ylabel("MSE / spread^2")
            ax.set_title(f"{prior} data")
            ax.legend(fontsize=7)

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Every method at M = 2..8 on 2^20 samples per prior (2^16 when ``quick``)."""
    n = 2**16 if quick else 2**20
    rows = []
    for prior in PRIORS:
        res = map_over_bits(ClipComparison(prior), BITS, (samples(prior, n),))
        for i, b in enumerate(BITS):
            row = {"prior": prior, "bits": b, "published_clip": PUBLISHED_CLIP[prior].get(b)}
            row.update({k: float(v[i]) for k, v in res.items()})
            rows.append(row)
    table = Table.from_dicts(rows).with_meta(paper="Banner et al. 2019 (ACIQ)", samples=n)
    save_figure(out_dir, "aciq_banner2019", _plot(table))
    return write_tables(out_dir, {"aciq_banner2019": table})


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
