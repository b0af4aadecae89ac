"""Esser et al. (2019), LSQ, and Choi et al. (2018), PACT: the learned-range gradients.

LSQ (eq. 3) learns the step ``s`` of ``x_hat = s * clip(round(x / s), -Q_N, Q_P)``; the
straight-through gradient of one element is::

    d x_hat / d s = -x/s + round(x/s)   if -Q_N < x/s < Q_P
                  = -Q_N                if x/s <= -Q_N
                  = Q_P                 if x/s >= Q_P

scaled by ``g = 1 / sqrt(N Q_P)`` (sec. 2.2, N elements sharing ``s``). PACT (eq. 3) learns
the clip ``alpha`` of ``y = clip(x, 0, alpha)`` quantized to ``2^k - 1`` steps on [0, alpha]:
``d y_q / d alpha = 1`` for ``x >= alpha``, else 0.

This script differentiates ``jquant.fake_quant(..., estimator="lsq" | "pact")`` element by
element (``jax.jacobian`` with respect to the scale) at 2, 3, 4 and 8 bits and compares every
element with the closed forms above; the table holds the largest absolute difference.

Not yet reproduced: the QAT accuracy tables (STE vs PACT vs LSQ on MNIST-1D over 3 seeds),
which need ``jquant.nn``'s QAT layers; see README.md.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table

BITS = (2, 3, 4, 8)


def lsq_closed_form(x: np.ndarray, s: float, fmt: jq.IntFormat) -> np.ndarray:
    """Esser et al. eq. 3 times ``g = 1 / sqrt(N Q_P)``, per element (float64)."""
    v = x / s
    qn, qp = -fmt.qmin, fmt.qmax
    d = np.where(v <= -qn, -qn, np.where(v >= qp, qp, -v + np.round(v)))
    return d / np.sqrt(x.size * qp)


def pact_closed_form(x: np.ndarray, alpha: float) -> np.ndarray:
    """Choi et al. eq. 3: ``1[x >= alpha]``."""
    return (x >= alpha).astype(np.float64)


def gradient_rows(n: int, seed: int = 0) -> list[dict]:
    x = jax.random.normal(jax.random.key(seed), (n,), jnp.float32) * 2.0
    rows = []
    for b in BITS:
        signed, unsigned = jq.IntFormat(b), jq.IntFormat(b, signed=False)
        s = 3.0 / signed.qmax
        alpha = 2.5

        def lsq_fq(sc, fmt=signed):
            return jq.fake_quant(x, jq.QParams(sc), fmt, estimator="lsq")

        def pact_fq(a, fmt=unsigned):
            return jq.fake_quant(x, jq.pact_qparams(a, fmt), fmt, estimator="pact")

        lsq = jax.jacobian(lsq_fq)(jnp.float32(s))
        d_alpha = jax.jacobian(pact_fq)(jnp.float32(alpha))
        xs = np.asarray(x, np.float64)
        lsq_want = lsq_closed_form(xs, s, signed)
        pact_want = pact_closed_form(xs, alpha)
        rows.append(
            {
                "bits": b,
                "elements": n,
                "lsq_max_abs_diff": float(np.max(np.abs(np.asarray(lsq) - lsq_want))),
                "lsq_clipped_fraction": float(np.mean(np.abs(xs / s) >= signed.qmax)),
                "pact_max_abs_diff": float(np.max(np.abs(np.asarray(d_alpha) - pact_want))),
                "pact_clipped_fraction": float(np.mean(pact_want)),
            }
        )
    return rows


def _plot(x: np.ndarray, s: float, fmt: jq.IntFormat):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        order = np.argsort(x)
        ax.plot(x[order], lsq_closed_form(x, s, fmt)[order] * np.sqrt(x.size * fmt.qmax))
        ax.set_xlabel("x")
        ax.set_ylabel("d x_hat / d s (Esser et al. eq. 3)")
        ax.set_title(f"LSQ step gradient, {fmt.bits} bits, s = {s:.3g}")

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Gradient checks on 1,000 elements when ``quick``, else 100,000."""
    table = Table.from_dicts(gradient_rows(1_000 if quick else 100_000)).with_meta(
        paper="Esser et al. 2019 (LSQ), Choi et al. 2018 (PACT)",
        qat_tables="not run: needs jquant.nn QAT layers",
    )
    x = np.linspace(-4.0, 4.0, 2001)
    save_figure(out_dir, "lsq_pact_gradients", _plot(x, 1.0, jq.IntFormat(2)))
    return write_tables(out_dir, {"lsq_pact_gradients": table})


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
