"""The 6.02 dB per bit law: SQNR of uniform, sine and Gaussian signals at 2..16 bits.

A uniform quantizer of step ``s`` adds noise of power ``s^2 / 12`` when the error is uniform
on ``[-s/2, s/2]``. When the ``2^b`` cells of the grid exactly cover ``[-A, A]`` (the textbook
"full scale": ``s = 2A / 2^b``, outer levels at ``+-(A - s/2)``)::

    uniform on [-A, A]  (power A^2/3):  SQNR = 10 log10(4^b)            = 6.0206 b dB
    full-scale sine     (power A^2/2):  SQNR = 10 log10(1.5 * 4^b)      = 6.0206 b + 1.7609 dB

A min-max range (``qparams_from_range(-A, A)``) puts the outer *levels* at ``+-A`` instead, so
``s = 2A / (2^b - 1)``; the half-filled outer cells still have noise ``s^2 / 12`` (uniform on
``[0, s/2]``), and the law becomes ``20 log10(2^b - 1) = 6.0206 b + 20 log10(1 - 2^-b)``,
exact for uniform data. For any signal of rms ``sigma`` and min-max range ``c``, once the
noise is uniform (high widths)::

    SQNR = 20 log10(2^b - 1) + 4.7712 - 20 log10(c / sigma)

which is why min-max ranges are poor for Gaussian data (``c`` is the sample maximum, about 5
sigma for 2^20 samples) and why MSE-optimal clipping gains at low widths.

Everything is one sweep: ``jquant.sweep.map_over_bits`` vmaps the widths 2..16 (traced
``IntFormat(bits, midrise=True)``, the ``2^b``-level grid) over all signals in one compiled
program; the optimal clip is ``jquant.calibration.mse`` inside the same vmap.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

import jquant as jq
from jquant import calibration, metrics
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table, map_over_bits

DB_PER_BIT = 20 * np.log10(2.0)  # 6.0206
SINE_OFFSET = 10 * np.log10(1.5)  # 1.7609
BITS = tuple(range(2, 17))


def signals(n: int) -> dict[str, jnp.ndarray]:
    """Uniform on [-1, 1] and a unit sine at the low-discrepancy (Weyl) phases
    ``frac(i / golden ratio)``, and the N(0, 1) quantiles ``ndtri((i + 1/2) / n)``."""
    u = np.modf(np.arange(n) * ((np.sqrt(5.0) - 1) / 2))[0]
    return {
        "uniform": jnp.asarray(2 * u - 1, jnp.float32),
        "sine": jnp.asarray(np.sin(2 * np.pi * u), jnp.float32),
        "gaussian": jnp.asarray(ndtri((np.arange(n) + 0.5) / n), jnp.float32),
    }


def _sqnr(x, rmin, rmax, fmt):
    qp = jq.qparams_from_range(rmin, rmax, fmt, symmetric=True)
    return metrics.sqnr_db(x, jq.fake_quant(x, qp, fmt))


def sqnr_at(bits, sig: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """SQNR of every signal at width ``bits`` (traced): min-max ranges, full-scale ranges
    (min-max shrunk by ``1 - 2^-b``, so that the cells cover it) for the uniform and sine
    signals, and the MSE-optimal clip for the Gaussian."""
    fmt = jq.IntFormat(bits, midrise=True)
    out = {f"{k}_minmax_db": _sqnr(x, *calibration.minmax(x), fmt) for k, x in sig.items()}
    full_scale = 1.0 - jnp.exp2(-jnp.asarray(bits, jnp.float32))
    for k in ("uniform", "sine"):
        lo, hi = calibration.minmax(sig[k])
        out[f"{k}_full_scale_db"] = _sqnr(sig[k], full_scale * lo, full_scale * hi, fmt)
    lo, hi = calibration.mse(sig["gaussian"], fmt, symmetric=True)
    out["gaussian_mse_clip_db"] = _sqnr(sig["gaussian"], lo, hi, fmt)
    out["gaussian_mse_clip_sigma"] = hi
    return out


def slope(bits, db) -> float:
    """Least-squares dB per bit."""
    return float(np.polyfit(np.asarray(bits, float), np.asarray(db, float), 1)[0])


def _plot(table: Table):
    def draw(fig):
        b = np.array(table.column("bits"))
        ax = fig.add_subplot(1, 2, 1)
        for k in ("uniform", "sine"):
            ax.plot(b, table.column(f"{k}_full_scale_db"), "o", label=f"{k}, full scale")
        ax.plot(b, table.column("gaussian_minmax_db"), "^", label="gaussian, min-max")
        ax.plot(b, table.column("gaussian_mse_clip_db"), "s", label="gaussian, MSE clip")
        ax.plot(b, DB_PER_BIT * b, "k-", lw=0.8, label="6.02 b")
        ax.plot(b, DB_PER_BIT * b + SINE_OFFSET, "k--", lw=0.8, label="6.02 b + 1.76")
        ax.set_xlabel("bits")
        ax.set_ylabel("SQNR (dB)")
        ax.legend(fontsize=7)
        ax = fig.add_subplot(1, 2, 2)
        ax.plot(
            b,
            np.array(table.column("uniform_full_scale_db")) - DB_PER_BIT * b,
            "o-",
            label="uniform full scale - 6.02 b",
        )
        ax.plot(
            b,
            np.array(table.column("sine_full_scale_db")) - DB_PER_BIT * b - SINE_OFFSET,
            "o-",
            label="sine full scale - (6.02 b + 1.76)",
        )
        ax.plot(
            b,
            np.array(table.column("uniform_minmax_db"))
            - np.array(table.column("uniform_minmax_law_db")),
            "o-",
            label="uniform min-max - 20 log10(2^b - 1)",
        )
        ax.plot(
            b,
            np.array(table.column("gaussian_minmax_db"))
            - np.array(table.column("gaussian_minmax_law_db")),
            "o-",
            label="gaussian min-max - loading law",
        )
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("bits")
        ax.set_ylabel("deviation from the law (dB)")
        ax.legend(fontsize=7)

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """One vmapped sweep over 2..16 bits (2^16 samples when ``quick``, else 2^20)."""
    n = 2**16 if quick else 2**20
    sig = signals(n)
    res = map_over_bits(sqnr_at, BITS, (sig,))
    g = np.asarray(sig["gaussian"], np.float64)
    loading = 10 * np.log10(3.0 * np.mean(g * g) / np.max(np.abs(g)) ** 2)
    rows = []
    for i, b in enumerate(BITS):
        span = 20 * np.log10(2.0**b - 1)
        rows.append(
            {
                "bits": b,
                "uniform_law_db": DB_PER_BIT * b,
                "uniform_full_scale_db": float(res["uniform_full_scale_db"][i]),
                "uniform_minmax_law_db": span,
                "uniform_minmax_db": float(res["uniform_minmax_db"][i]),
                "sine_law_db": DB_PER_BIT * b + SINE_OFFSET,
                "sine_full_scale_db": float(res["sine_full_scale_db"][i]),
                "sine_minmax_db": float(res["sine_minmax_db"][i]),
                "gaussian_minmax_law_db": span + loading,
                "gaussian_minmax_db": float(res["gaussian_minmax_db"][i]),
                "gaussian_mse_clip_db": float(res["gaussian_mse_clip_db"][i]),
                "gaussian_mse_clip_sigma": float(res["gaussian_mse_clip_sigma"][i]),
            }
        )
    table = Table.from_dicts(rows)
    fit = [b for b in BITS if b >= 4]
    slopes = {
        f"slope_{k[:-3]}_db_per_bit": slope(fit, [r[k] for r in rows if r["bits"] >= 4])
        for k in ("uniform_full_scale_db", "sine_full_scale_db", "gaussian_minmax_db")
    }
    table = table.with_meta(paper="6.02 dB per bit", samples=n, **slopes)
    save_figure(out_dir, "sqnr_6db", _plot(table))
    return write_tables(out_dir, {"sqnr_6db": table})


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
