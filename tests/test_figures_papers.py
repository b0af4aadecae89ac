"""Every figure in papers/{max1960,sqnr_6db,aciq_banner2019,jacob2018_integer,
krishnamoorthi2018}/README.md, section by section, against the committed results files.

Each ``_<paper>`` function below returns, per ``##`` section of that paper's README, the
figures the section prints (computed here from ``papers/<paper>/results/*.json`` and formatted
to the printed precision) and the numbers that are setup (widths, seeds, step counts,
citations, test tolerances). :func:`figures.check_section` fails when a figure drifts from its
results file or the section prints a number with nothing behind it. Published numbers come
from the committed transcriptions (``published.json`` and the like, each naming its source).
No paper is rerun here: this reads files only.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pytest
from figures import ROOT, check_section, load

Section = tuple[Mapping[str, str], Iterable[str]]  # (figures, setup)


# --- formatting, to the printed precision ------------------------------------------------------


def _tidy(s: str) -> str:
    """Exponents as printed: ``8.5e-05`` -> ``8.5e-5``, ``1e+03`` -> ``1e3``."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", s)


def sig(x: float, n: int) -> str:
    """``x`` to ``n`` significant digits, trailing zeros dropped, exponent as ``8.5e-5``."""
    return _tidy(f"{x:.{n}g}")


def sig0(x: float, n: int) -> str:
    """``x`` to ``n`` significant digits, trailing zeros kept (``0.5860``)."""
    return f"{x:#.{n}g}"


def exp1(x: float) -> str:
    """``x`` to one significant digit in scientific notation, as printed: ``2e-4``."""
    return _tidy(f"{x:.0e}")


def pct(x: float) -> str:
    """A fraction in percent to one decimal: 0.9323 -> ``93.2``."""
    return f"{100 * x:.1f}"


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1)."""
    a = np.asarray(list(xs), float)
    return float(a.mean()), float(a.std(ddof=1))


def pm(xs: Iterable[float], suffix: str = "") -> str:
    """Fractions as ``mean +- std`` in percent (sample std), e.g. ``93.2 +- 0.3 %``."""
    m, s = mean_std(xs)
    return f"{pct(m)} +- {pct(s)}{suffix}"


def rows(path: str, **where) -> list[dict]:
    """The rows of a results table whose columns equal ``where``."""
    return [r for r in load(path)["rows"] if all(r[k] == v for k, v in where.items())]


def one(path: str, **where) -> dict:
    """The single row of a results table matching ``where``."""
    (r,) = rows(path, **where)
    return r


def table_row(*cells: str) -> str:
    """A markdown table row ``| a | b | ... |``."""
    return "| " + " | ".join(cells) + " |"


# --- 1. Max (1960) -----------------------------------------------------------------------------

MAX = "papers/max1960/results/max1960.json"
MAX_PUB = "papers/max1960/results/published.json"


def _max1960() -> dict[str, Section]:
    pub = {r["levels"]: r for r in load(MAX_PUB)["rows"]}
    ours = {r["levels"]: r for r in rows(MAX, distribution="gaussian")}
    lap = {r["levels"]: r for r in rows(MAX, distribution="laplace")}
    samples = int(math.log2(load(MAX)["meta"]["samples"]))
    step_err = max(abs(ours[n]["uniform_step_closed_form"] - pub[n]["uniform_step"]) for n in pub)
    worst = max(
        pub, key=lambda n: abs(ours[n]["uniform_step_closed_form"] - pub[n]["uniform_step"])
    )

    def last_digit_low(n: int) -> str:
        p = pub[n]["lloyd_max_mse"]
        ulp = 10.0 ** (math.floor(math.log10(p)) - 3)  # printed to 4 significant digits
        return str(round((ours[n]["lloyd_max_mse_closed_form"] - p) / ulp))

    def gain(r: dict) -> str:
        return f"{r['lloyd_max_sqnr_db'] - r['uniform_sqnr_db']:.1f}"

    gauss_sampled = max(
        abs(r["uniform_mse_calibrated"] - r["uniform_mse_closed_form"]) for r in ours.values()
    )
    lap_tail = max(
        (r["uniform_mse_closed_form"] - r["uniform_mse_calibrated"]) / r["uniform_mse_closed_form"]
        for n, r in lap.items()
        if n >= 31
    )
    return {
        "Claim": ({}, ["6", "1", "1960"]),
        "Published": (
            {
                f"N={n}": table_row(
                    str(n),
                    sig0(p["uniform_step"], 4),
                    sig0(p["uniform_mse"], 4),
                    sig0(p["lloyd_max_mse"], 4),
                )
                for n, p in pub.items()
            },
            ["1960"],
        ),
        "Ours": (
            {
                "samples": f"2^{samples}",
                **{
                    f"N={n}": table_row(
                        str(n),
                        *(
                            sig(ours[n][c], 5)
                            for c in (
                                "uniform_step_closed_form",
                                "uniform_step_calibrated",
                                "uniform_mse_closed_form",
                                "uniform_mse_calibrated",
                                "lloyd_max_mse_closed_form",
                            )
                        ),
                    )
                    for n in pub
                },
            },
            # calibration grid (32 candidates x 3 rounds), the N = 2^b, 2^b - 1 grids, N(0, 1)
            ["32", "3", "2", "1", "0"],
        ),
        "Agreement": (
            {
                "step error": f"agrees to {exp1(step_err)}",
                "worst step": f"N = {worst} step {sig0(pub[worst]['uniform_step'], 4)} vs exact "
                f"{sig(ours[worst]['uniform_step_closed_form'], 5)}",
                "Lloyd-Max": "ours ("
                + ", ".join(sig(ours[n]["lloyd_max_mse_closed_form"], 5) for n in pub)
                + ")",
                "Max printed": f"Max printed {sig0(pub[8]['lloyd_max_mse'], 4)} and "
                f"{sig0(pub[16]['lloyd_max_mse'], 4)}",
                "last digit": f"low by {last_digit_low(8)} (N = 8) and by {last_digit_low(16)} "
                "(N = 16)",
                "gain": f"N = 32: {gain(lap[32])} dB vs {gain(ours[32])} dB",
                "gauss sampled": f"agree to {exp1(gauss_sampled)} absolute",
                "laplace tail": f"({100 * lap_tail:.2f} %)",
            },
            # the tests' tolerances and the N they cover
            ["4", "8", "16", "5e-4", "2e-6", "3", "0.1", "2", "20", "31", "32"],
        ),
        "Run": ({}, ["4", "8", "16", "3", "2", "18"]),
    }


def test_max1960_published_transcription_is_the_scripts():
    """The transcription, the script's constant and the results' published columns agree."""
    from jquant import reproduce

    script = reproduce.load_paper("max1960").PUBLISHED
    pub = load(MAX_PUB)
    assert "Max" in pub["source"] and "Table" in pub["source"]
    for p in pub["rows"]:
        n = p["levels"]
        assert script[n] == {k: p[k] for k in ("uniform_step", "uniform_mse", "lloyd_max_mse")}
        r = one(MAX, distribution="gaussian", levels=n)
        for k in ("uniform_step", "uniform_mse", "lloyd_max_mse"):
            assert r[f"{k}_published"] == p[k]


def test_max1960_uniform_mse_to_every_printed_digit():
    """The README's claim: both routes round to Max's printed uniform MSE."""
    for p in load(MAX_PUB)["rows"]:
        r = one(MAX, distribution="gaussian", levels=p["levels"])
        for col in ("uniform_mse_closed_form", "uniform_mse_calibrated"):
            assert sig0(r[col], 4) == sig0(p["uniform_mse"], 4), (p["levels"], col)


# --- 2. The 6.02 dB per bit law ----------------------------------------------------------------

SQNR = "papers/sqnr_6db/results/sqnr_6db.json"


def _sqnr_6db() -> dict[str, Section]:
    meta = load(SQNR)["meta"]
    r = {x["bits"]: x for x in load(SQNR)["rows"]}
    b = np.array(sorted(r))

    def col(name: str) -> np.ndarray:
        return np.array([r[k][name] for k in b])

    per_bit = col("uniform_law_db") / b
    sine_offset = col("sine_law_db") - col("uniform_law_db")
    uniform_dev = np.abs(col("uniform_full_scale_db") - col("uniform_law_db")).max()
    sine_dev = np.abs(col("sine_full_scale_db") - col("sine_law_db"))
    gauss_dev = np.abs(col("gaussian_minmax_db") - col("gaussian_minmax_law_db"))
    below = (col("uniform_law_db") - col("gaussian_minmax_db"))[b >= 3]
    gain = dict(
        zip(b.tolist(), col("gaussian_mse_clip_db") - col("gaussian_minmax_db"), strict=True)
    )
    # the sample max c/sigma, from the min-max law column: law = 20 log10((2^b - 1) sqrt 3 / c)
    c = 10 ** ((20 * np.log10(2.0**b - 1) + 10 * np.log10(3) - col("gaussian_minmax_law_db")) / 20)
    np.testing.assert_allclose(c, c[0], rtol=1e-6)  # one sample, one maximum
    pub4 = next(x for x in load(MAX_PUB)["rows"] if x["levels"] == 4)
    assert abs(10 * np.log10(1 / pub4["uniform_mse"]) - r[2]["gaussian_mse_clip_db"]) < 0.01
    return {
        "Claim": (
            {
                "dB per bit": f"{per_bit[0]:.4f} b dB",
                "sine": f"{per_bit[0]:.4f} b + {sine_offset[0]:.4f} dB",
            },
            ["1948", "2008"],
        ),
        "Ours": (
            {
                "samples": f"2^{int(math.log2(meta['samples']))} samples",
                "uniform exact": f"{per_bit[0]:.4f} b dB to {exp1(uniform_dev)} dB",
                "slope": f"(fitted slope {meta['slope_uniform_full_scale_db_per_bit']:.4f} dB/bit)",
                "min-max 2 bits": f"({r[2]['uniform_minmax_db']:.2f} dB at 2",
                "full scale 2 bits": f"instead of {r[2]['uniform_full_scale_db']:.2f})",
                "law": f"= {per_bit[0]:.4f} b + 20 log10",
                **{
                    f"bits={k}": table_row(
                        str(k),
                        *(
                            f"{r[k][n]:.3f}"
                            for n in (
                                "uniform_law_db",
                                "uniform_full_scale_db",
                                "sine_law_db",
                                "sine_full_scale_db",
                            )
                        ),
                        f"{r[k]['gaussian_minmax_db']:.2f}",
                        f"{r[k]['gaussian_mse_clip_db']:.2f} "
                        f"({r[k]['gaussian_mse_clip_sigma']:.2f})",
                    )
                    for k in (2, 4, 8, 12, 16)
                },
                "header": f"| bits | {per_bit[0]:.2f} b |",
            },
            # widths, quick sample size, the grids' 2^b - 1, 20 log10 and s^2/12
            ["2", "16", "1", "20", "12"],
        ),
        "Agreement": (
            {
                "sine offset": f"+{sine_offset[0]:.2f} dB law",
                "sine 12": f"within {sine_dev[b >= 12].max():.2f} dB from 12 bits",
                "sine 8": f"{sine_dev[b >= 8].max():.1f} dB from 8 bits",
                "sine 2": f"{sine_dev[0]:.1f} dB low at 2 bits",
                "c": f"{c[0]:.1f} sigma for 2^{int(math.log2(meta['samples']))} quantiles",
                "gauss law": f"within {exp1(gauss_dev[b >= 3].max())} dB from 3 bits",
                "below": f"{below.min():.0f} to {below.max():.0f} dB below",
                "gain": f"+{gain[2]:.1f} dB at 2 bits, +{gain[4]:.1f} dB at 4, "
                f"+{gain[8]:.1f} dB at 8",
                "gain 12": f"at most {max(v for k, v in gain.items() if k >= 12):.2f} dB from 12",
                "max1960": f"(MSE {sig0(pub4['uniform_mse'], 4)}, "
                f"{r[2]['gaussian_mse_clip_db']:.2f} dB",
            },
            # the tests' tolerances; the law's constants (4.77 = 10 log10 3); bit widths
            ["5e-3", "5e-4", "4", "2", "1", "20", "4.77"],
        ),
        "Run": ({}, ["4", "16"]),
    }


# --- 3. Banner et al. (2019), ACIQ -------------------------------------------------------------

ACIQ = "papers/aciq_banner2019/results/aciq_banner2019.json"
ACIQ_PUB = "papers/aciq_banner2019/results/published.json"


def _aciq_mse(x: float) -> str:
    """The ACIQ table's MSE: 4 significant digits, ``8.52e-5`` below 1e-3."""
    return sig(x, 4) if x >= 1e-3 else _tidy(f"{x:.2e}")


def _aciq_banner2019() -> dict[str, Section]:
    pub = {(p["prior"], p["bits"]): p["alpha_star"] for p in load(ACIQ_PUB)["rows"]}
    r = {(x["prior"], x["bits"]): x for x in load(ACIQ)["rows"]}
    samples = int(math.log2(load(ACIQ)["meta"]["samples"]))
    low = [x for k, x in r.items() if k[1] <= 4]
    vs_minmax = [x["minmax_mse"] / x["aciq_mse"] for x in low]
    vs_mse = [100 * (x["aciq_mse"] / x["mse_mse"] - 1) for x in r.values()]
    model56 = [
        100 * abs(x["aciq_mse"] / x["aciq_model_mse"] - 1) for k, x in r.items() if k[1] in (5, 6)
    ]
    model2 = [100 * (x["aciq_mse"] / x["aciq_model_mse"] - 1) for k, x in r.items() if k[1] == 2]
    max_step = next(x for x in load(MAX_PUB)["rows"] if x["levels"] == 4)["uniform_step"]
    emp2 = r[("gaussian", 2)]["mse_clip"]

    def t_star(prior: str, bits: int) -> str:
        return sig(r[(prior, bits)]["aciq_t_star"], 5)

    table = {}
    for prior, bits in [
        ("gaussian", 2),
        ("gaussian", 4),
        ("gaussian", 8),
        ("laplace", 2),
        ("laplace", 3),
        ("laplace", 4),
    ]:
        x = r[(prior, bits)]
        paper = f" ({pub[(prior, bits)]})" if (prior, bits) in pub else ""
        assert x["published_clip"] == pub.get((prior, bits))  # the run carries the transcription
        table[f"{prior} {bits}"] = table_row(
            prior,
            str(bits),
            t_star(prior, bits) + paper,
            *(_aciq_mse(x[c]) for c in ("aciq_mse", "mse_mse", "minmax_mse", "aciq_model_mse")),
        )
    exact = [k for k, v in pub.items() if f"{r[k]['aciq_t_star']:.2f}" == f"{v:.2f}"]
    truncated = [k for k in pub if k not in exact]
    assert sorted(truncated) == [("gaussian", 4), ("laplace", 3)]
    for k in truncated:  # one unit low in the last printed digit: truncation, not rounding
        assert math.floor(r[k]["aciq_t_star"] * 100) / 100 == pytest.approx(pub[k])
    return {
        "Claim": (
            {
                f"M={m}": table_row(
                    str(m), f"{pub[('laplace', m)]:.2f}", f"{pub[('gaussian', m)]:.2f}"
                )
                for m in (2, 3, 4)
            },
            ["4", "2019", "0"],
        ),
        "Ours": (
            {
                "samples": f"(2^{samples};",
                "samples again": f"full run, 2^{samples} samples",
                **table,
            },
            ["1", "2", "16", "8"],
        ),
        "Agreement": (
            {
                "match": ", ".join(f"{pub[k]:.2f}" for k in exact) + " match",
                "laplace 3": f"Laplace M = 3 is {t_star('laplace', 3)} "
                f"(printed {pub[('laplace', 3)]:.2f})",
                "gaussian 4": f"Gaussian M = 4 is {t_star('gaussian', 4)}",
                "printed 4": f"(printed {pub[('gaussian', 4)]:.2f}): the paper",
                "vs minmax": f"({min(vs_minmax):.0f}x-{max(vs_minmax):.0f}x lower",
                "vs mse": f"within {min(vs_mse):.0f}-{max(vs_mse):.0f} % of the empirical",
                "model 5, 6": f"(within {max(model56):.0f} %)",
                "model 2": f"is {min(model2):.0f}-{max(model2):.0f} % above it",
                "empirical 2": f"is {emp2:.2f} sigma, within "
                f"{100 * abs(emp2 / (2 * max_step) - 1):.1f} %",
                "max1960": f"step {sig0(max_step, 4)} (paper max1960), "
                f"not {pub[('gaussian', 2)]:.2f}",
            },
            # the tests' tolerance; widths; "2 x" Max's 4-level step
            ["0.01", "2", "4", "5", "6", "7"],
        ),
        "Run": ({}, []),
    }


# --- 4. Jacob et al. (2018) --------------------------------------------------------------------

JACOB = "papers/jacob2018_integer/results/"


def _jacob2018_integer() -> dict[str, Section]:
    third = one(JACOB + "multipliers.json", M=1 / 3)
    rel = [r["relative_error"] for r in load(JACOB + "multipliers.json")["rows"]]
    assert max(rel) <= 2.0**-31  # "a relative error <= 2^-31"
    half = one(JACOB + "rounding.json", x=-12)
    requant = load(JACOB + "requant.json")["rows"]
    assert all(r["max_abs_diff"] <= 1 for r in requant)  # every mode within one unit
    double = one(JACOB + "requant.json", M=1 / 3, mode="double")
    assert one(JACOB + "requant.json", M=1 / 3, mode="single")["equal_to_rounded_product"] == 1.0

    ptq = load(JACOB + "integer_only.json")["rows"]
    qat = load(JACOB + "qat_bn_folding.json")["rows"]
    pub = load(JACOB + "published.json")["rows"]

    def col(rs: list[dict], name: str) -> list[float]:
        return [r[name] for r in rs]

    def span(xs: Iterable[float], fmt: str = ".2f") -> str:
        return f"{min(xs):{fmt}} to {max(xs):{fmt}}"

    def loss(rs: list[dict], a: str, b: str) -> str:
        return f"{100 * (mean_std(col(rs, a))[0] - mean_std(col(rs, b))[0]):.1f}"

    steps_ptq = [r["max_abs_logit_diff"] / r["output_scale"] for r in ptq]
    steps_qat = [r["max_abs_logit_diff_integer_vs_folded"] / r["output_scale"] for r in qat]
    folded_vs_zoo = col(qat, "max_abs_logit_diff_folded_vs_zoo")
    assert max(d / r["output_scale"] for d, r in zip(folded_vs_zoo, qat, strict=True)) < 1
    assert col(qat, "qat_folded_bn") == col(qat, "zoo_fake_quant")  # identical accuracies
    pub_loss = [p["float"] - p["integer_quantized"] for p in pub]
    seeds = [str(r["seed"]) for r in ptq]
    assert seeds == [str(r["seed"]) for r in qat] == ["0", "1", "2"]
    return {
        "Claim": ({}, ["2018", "2.2", "0", "1", "0.5", "4.1"]),
        "Ours": (
            {
                "1/3": f"M0 = {third['M0_int32']}, n = {third['n']}, "
                f"error {sig(third['relative_error'], 2)}",
                "half up": f"arithmetically gives {half['add_half_then_shift']}",
                "double misses": f"{100 * (1 - double['equal_to_rounded_product']):.0f} % of cases",
            },
            # [0.5, 1), 2^31, 2^-31, M = 1/3, n >= 1
            ["0.5", "1", "2", "31", "-31", "3"],
        ),
        "Agreement": ({}, []),
        "Integer-only MNIST-1D": (
            {
                "table": table_row(
                    *(
                        pm(col(ptq, c), " %")
                        for c in ("float", "fake_quant_w8a8", "integer_only", "same_prediction")
                    )
                ),
                "logit diff": f"fake-quant: {span(col(ptq, 'max_abs_logit_diff'))}, about "
                f"{np.mean(steps_ptq):.1f} output steps",
                "output scale": f"output scale is {span(col(ptq, 'output_scale'))})",
                "loss": f"({loss(ptq, 'float', 'integer_only')} points here)",
            },
            # float steps, seeds, calibration batches, 8-bit grids, quick MLP steps
            ["4.1", "600", *seeds, "8", "30"],
        ),
        "QAT with BatchNorm folding": (
            {
                "table": table_row(
                    *(
                        pm(col(qat, c))
                        for c in (
                            "float",
                            "ptq_w8a8",
                            "qat_folded_bn",
                            "integer_only",
                            "same_prediction",
                        )
                    )
                ),
                "seeds": f"in all {len(qat)} seeds",
                "folded vs zoo": f"(largest difference {sig(min(folded_vs_zoo), 2)} to "
                f"{max(folded_vs_zoo):.2f}",
                "within float": f"within {loss(qat, 'float', 'integer_only')} points of float",
                "logits": f"{span(col(qat, 'max_abs_logit_diff_integer_vs_folded'))} of its",
                "steps": f"(about {np.mean(steps_qat):.1f} output steps",
                "saturated": f"the {span([100 * x for x in col(qat, 'saturated_fraction')])} % "
                "of logits",
            },
            # x2 conv blocks, float / QAT steps, 8 calibration batches, Adam 1e-3, seeds, 8-bit
            ["4.1", "2", "600", "200", "8", "1e-3", *seeds],
        ),
        "Differences from the paper": ({}, ["4.1", "3.2"]),
        "Published Table 4.1": (
            {
                "depth": table_row("ResNet depth", *(str(p["resnet_depth"]) for p in pub)),
                "float": table_row("floating-point accuracy", *(f"{p['float']:.1f}%" for p in pub)),
                "int": table_row(
                    "integer-quantized accuracy", *(f"{p['integer_quantized']:.1f}%" for p in pub)
                ),
                "their loss": f"lose {span(pub_loss, '.1f')} points",
                "our loss": f"ours loses {loss(qat, 'float', 'integer_only')}",
                "our loss PTQ": f"to {loss(ptq, 'float', 'integer_only')} (PTQ)",
            },
            # the paper's "within 2%", class counts
            ["2", "1000", "10"],
        ),
        "Run": ({}, []),
    }


# --- 5. Krishnamoorthi (2018) ------------------------------------------------------------------

KR = "papers/krishnamoorthi2018/results/krishnamoorthi2018.json"
KR_RUNS = "papers/krishnamoorthi2018/results/krishnamoorthi2018_runs.json"
KR_PUB = "papers/krishnamoorthi2018/results/krishnamoorthi2018_published.json"
KR_TABLES = ("table2", "table3", "table4", "table5", "table6")


def _published_fraction(v: float) -> str:
    """As the paper prints a top-1 fraction: 0.7 -> ``0.70``, 0.591 -> ``0.591``."""
    return f"{v:.2f}" if round(v, 2) == v else f"{v:g}"


def _krishnamoorthi2018() -> dict[str, Section]:
    summary = load(KR)
    runs = load(KR_RUNS)["rows"]
    cols = {(r["dataset"], r["table"], r["column"]): r for r in summary["rows"]}
    for (ds, table, column), r in cols.items():  # the summary is the runs' mean +- sample std
        q = [
            x["quantized"]
            for x in runs
            if (x["dataset"], x["table"], x["column"]) == (ds, table, column)
        ]
        m, sd = mean_std(q)
        assert (len(q), m, sd) == (
            r["seeds"],
            pytest.approx(r["quantized_mean"]),
            pytest.approx(r["quantized_std"]),
        )

    def q(ds: str, table: str, column: str) -> str:
        return pct(cols[(ds, table, column)]["quantized_mean"])

    def qs(ds: str, table: str, column: str) -> str:
        r = cols[(ds, table, column)]
        return f"{pct(r['quantized_mean'])} +- {pct(r['quantized_std'])}"

    def ours_cell(ds: str, table: str) -> str:
        names = [c for d, t, c in cols if (d, t) == (ds, table)]
        if table in ("table2", "table3", "table4"):  # one shared (largest) std per cell
            sd = max(cols[(ds, table, c)]["quantized_std"] for c in names)
            return " / ".join(q(ds, table, c) for c in names) + f" (+- {pct(sd)})"
        if table == "collapse":
            bold = qs(ds, table, "asym per-layer rescaled")
            return f"**{bold}** / {qs(ds, table, 'sym per-channel rescaled')}"
        return " / ".join(qs(ds, table, c) for c in names)

    datasets = ("mnist1d", "digits")
    ours = {
        t: "| " + " | ".join(ours_cell(ds, t) for ds in datasets) + " |"
        for t in (*KR_TABLES, "collapse")
    }
    floats = {ds: cols[(ds, "table2", "asym per-layer")] for ds in datasets}
    assert all(r["float_mean"] == floats[r["dataset"]]["float_mean"] for r in cols.values())

    pub_rows = load(KR_PUB)["rows"]
    nets = list(dict.fromkeys(r["network"] for r in pub_rows))

    def pub_cell(net: str, table: str) -> str:
        return " / ".join(
            _published_fraction(r["top1"])
            for r in pub_rows
            if (r["network"], r["table"]) == (net, table)
        )

    pub = {t: "| " + " | ".join(pub_cell(n, t) for n in nets) + " |" for t in KR_TABLES}
    pub_float = {n: next(r["float_top1"] for r in pub_rows if r["network"] == n) for n in nets}
    pub_of = {(r["network"], r["table"], r["column"]): r["top1"] for r in pub_rows}
    mb = "Mobilenet-v1_1_224"

    per_channel_ptq = [
        abs(r["quantized_mean"] - r["float_mean"])
        for (ds, t, c), r in cols.items()
        if t in ("table2", "table3") and c.endswith("per-channel")
    ]
    # "Symmetric vs asymmetric ... all within one std"; "Table 4's QAT gains are within one std"
    for ds in datasets:
        for t in ("table2", "table3"):
            a, b = cols[(ds, t, "sym per-channel")], cols[(ds, t, "asym per-channel")]
            assert abs(a["quantized_mean"] - b["quantized_mean"]) <= max(
                a["quantized_std"], b["quantized_std"]
            )
        for ptq_col, qat_col in [
            ("asym per-layer PTQ", "asym per-layer QAT"),
            ("sym per-channel PTQ", "sym per-channel QAT"),
        ]:
            a, b = cols[(ds, "table4", ptq_col)], cols[(ds, "table4", qat_col)]
            assert abs(a["quantized_mean"] - b["quantized_mean"]) <= max(
                a["quantized_std"], b["quantized_std"]
            )
    rescaled = [
        x["quantized"]
        for x in runs
        if (x["dataset"], x["table"], x["column"])
        == ("mnist1d", "collapse", "asym per-layer rescaled")
    ]
    schemes = {
        ds: len(
            {
                (r["w_bits"], r["a_bits"], r["granularity"], r["symmetric"])
                for (d, _, _), r in cols.items()
                if d == ds
            }
        )
        for ds in datasets
    }
    assert schemes["mnist1d"] == schemes["digits"]
    seconds = summary["meta"]["seconds"]
    mnist, digits = "mnist1d", "digits"

    def fl(ds: str) -> str:
        return f"{pct(floats[ds]['float_mean'])} +- {pct(floats[ds]['float_std'])}"

    def mb3(column: str) -> str:
        return _published_fraction(pub_of[(mb, "table3", column)])

    m3, m5, m6, mc = (
        functools.partial(q, mnist, t) for t in ("table3", "table5", "table6", "collapse")
    )
    d3, d5, dc = (functools.partial(q, digits, t) for t in ("table3", "table5", "collapse"))
    return {
        "Claims": ({}, ["1806.08342", "8", "2", "3", "4", "5", "6"]),
        "Published numbers": (
            {
                "float": "| 1 | float | "
                + " | ".join(_published_fraction(pub_float[n]) for n in nets)
                + " |",
                **{f"Table {t}": pub[t] for t in KR_TABLES},
            },
            # "top-1", the tables and columns the text names, the w/a bit widths
            ["1806.08342", "1", "2", "3", "4", "5", "6", "8"],
        ),
        "Ours": (
            {
                "float": f"{fl(mnist)} (MNIST-1D) and {fl(digits)} (digits)",
                **{f"ours {t}": ours[t] for t in (*KR_TABLES, "collapse")},
                "seeds": f"over the {floats[mnist]['seeds']} seeds",
                "qat steps": f"{summary['meta']['qat_steps']} steps of straight-through",
            },
            # float steps, seeds, x2 blocks, calibration batches, lr, table numbers, bit widths
            ["600", "300", "0", "1", "2", "8", "1e-3", "3", "4", "5", "6"],
        ),
        "Where our trend agrees": (
            {
                "per-channel": f"within {max(per_channel_ptq) * 100:.1f} points of float",
                "act only": f"({m3('activation only')} / {d3('activation only')})",
                "w4": f"(MNIST-1D {m5('sym per-channel PTQ')} vs {m5('asym per-layer PTQ')}, "
                f"digits {d5('sym per-channel PTQ')} vs {d5('asym per-layer PTQ')})",
                "w4 qat": f"({m5('sym per-channel QAT')}, {d5('sym per-channel QAT')})",
                "a4": f"PTQ (8,4) {m6('(8,4) PTQ')} vs PTQ (4,8)",
                "a4 w4": f"per channel {m5('sym per-channel PTQ')}), QAT helps ({m6('(8,4) QAT')})",
                "a4 vs w4 qat": f"4-bit weights ({m6('(4,8) QAT')})",
                "collapse mnist": f"{mc('asym per-layer')} to {mc('asym per-layer rescaled')} "
                f"({100 * min(rescaled):.0f} to {100 * max(rescaled):.0f} % by seed)",
                "collapse digits": f"from {dc('asym per-layer')} to "
                f"{dc('asym per-layer rescaled')}",
            },
            # claim 1, Tables 2-3, 5, 6, bit widths, the rescaling 1 to 1000
            ["1", "2", "3", "4", "5", "6", "8", "1000"],
        ),
        "Where it does not": (
            {
                "no collapse": f"({mc('asym per-layer')} vs {mc('sym per-channel')})",
                "their 0.001": f"their {mb3('asym per-layer')} either",
                "gap": f"({mb3('sym per-channel')} vs {mb3('asym per-channel')}, Table 3)",
                "digits a4": f"as good as float ({q(digits, 'table6', '(8,4) PTQ')})",
            },
            # 8 bits, "1" in "v1", 3 decades (1 to 1000), Tables 3, 4, 6, (8,4)
            ["8", "1", "3", "4", "6"],
        ),
        "Cost": (
            {
                "schemes": f"({schemes['mnist1d']} per data set)",
                "seconds": f"{seconds:.0f} s ({int(seconds // 60)} min {int(seconds % 60)} s)",
            },
            ["6", "2"],  # 2 data sets x 3 seeds float models; a 2-core machine
        ),
        "Run": ({}, ["30"]),
    }


# --- 6. LLM PTQ on the small GPT: GPTQ, AWQ, SmoothQuant, QuaRot --------------------------------


def _llm(paper: str) -> tuple[dict, dict, list[dict], dict]:
    """A paper's summary rows by name, its meta, its verdict rows and its published.json."""
    root = f"papers/{paper}/results/{paper}"
    summary = load(root + ".json")
    by_name = {r["name"]: r for r in summary["rows"]}
    return (
        by_name,
        summary["meta"],
        load(root + "_verdict.json")["rows"],
        load(f"papers/{paper}/results/published.json"),
    )


def _ppl(r: dict) -> str:
    """A config's perplexity: ``mean +- std`` over seeds, or the single run."""
    return f"{r['ppl_mean']:.3f} +- {r['ppl_std']:.3f}" if r["runs"] > 1 else f"{r['ppl_mean']:.3f}"


def _inc(r: dict) -> str:
    return f"{r['increase_mean']:+.3f}"


_QUICK_SETUP = ["30", "2"]  # --quick: a 30-step GPT, 2 seeds


def _llm_run_setup(meta: dict) -> list[str]:
    """The protocol's numbers, as printed in each LLM paper's Ours section."""
    assert meta["train_steps"] == 1200
    assert "seeds=(0, 1, 2), calib_windows=32" in meta["protocol"]
    assert "eval_windows=256" in meta["protocol"]
    return ["0", "1", "2", "3", "32", "256", "128", "4", "1200"]


def _gptq_frantar2022() -> dict[str, Section]:
    s, meta, verdict, pub = _llm("gptq_frantar2022")
    claim = {}
    for r in pub["rows"]:
        ratio = (r["gptq_w3"] - r["fp16"]) / (r["rtn_w3"] - r["fp16"])
        cells = [f"{r[k]:.2f}" for k in ("fp16", "rtn_w4", "gptq_w4", "rtn_w3", "gptq_w3")]
        claim[r["model"]] = table_row(r["model"], *cells, f"{ratio:.2f}")
    ours = {"float": f"float model: {s['float']['ppl_mean']:.3f}"}
    for v in verdict:
        g = "" if v["grouping"] == "per-channel" else v["grouping"]
        rtn, gq = s[f"rtn_w{v['bits']}{g}"], s[f"gptq_w{v['bits']}{g}"]
        ours[f"{v['bits']} {v['grouping']}"] = table_row(
            str(v["bits"]), v["grouping"], _ppl(rtn), _ppl(gq), _inc(rtn), _inc(gq),
            f"{v['ratio']:.2f}",
        )  # fmt: skip
    agree = {}
    for v in verdict:
        if v["bits"] == 3:
            word = "holds" if v["holds"] else "fails"
            agree[f"3 {v['grouping']}"] = (
                f"3 bits, {v['grouping']}: ratio {v['ratio']:.2f} ({word})"
            )
    return {
        "Claim": (claim, ["2022", "3", "4", "0.5", "2023", "128", "17", "2"]),  # issue 17
        "Ours": (ours, _llm_run_setup(meta) + ["0.01", "8"]),
        "Agreement": (agree, ["3", "4", "0.5", "32"]),
        "Run": ({}, _QUICK_SETUP),
    }


def _awq_lin2023() -> dict[str, Section]:
    s, meta, verdict, _ = _llm("awq_lin2023")
    ours = {"float": f"float model: {s['float']['ppl_mean']:.3f}"}
    agree = {}
    for v in verdict:
        b = v["bits"]
        rtn, awq, clip = s[f"rtn_w{b}g32"], s[f"awq_w{b}g32"], s[f"awq_clip_w{b}g32"]
        ours[f"{b}"] = table_row(
            str(b), _ppl(rtn), _ppl(awq), _ppl(clip), _inc(rtn), _inc(awq), _inc(clip)
        )
        word = "holds" if v["holds"] else "fails"
        agree[f"{b}"] = f"{b} bits: AWQ - RTN = {v['awq_minus_rtn']:+.3f} ({word})"
        word = "holds" if v["clip_holds"] else "fails"
        agree[f"{b} clip"] = (
            f"{b} bits with clipping: AWQ - RTN = {v['awq_clip_minus_rtn']:+.3f} ({word})"
        )
    return {
        "Claim": ({}, ["2023", "1", "3", "4", "32", "17"]),
        # the clipping grid: ratios 1, 0.95, ..., 0.55 (20 steps, max shrink 0.5)
        "Ours": (ours, _llm_run_setup(meta) + ["0.95", "0.55", "20", "0.5"]),
        "Agreement": (agree, ["3", "4", "32"]),
        "Run": ({}, _QUICK_SETUP),
    }


def _outlier_rows(s: dict, names: list[str]) -> dict[str, str]:
    return {n: table_row(n, s[n]["base"], _ppl(s[n]), _inc(s[n])) for n in names}


def _outlier_setup(meta: dict) -> list[str]:
    prot = meta["protocol"]
    assert "outlier_channels=(5, 77), outlier_factor=32.0" in prot
    return ["5", "77", "32"]


def _smoothquant_xiao2022() -> dict[str, Section]:
    s, meta, (v,), _ = _llm("smoothquant_xiao2022")
    names = ["float", "float_outlier", "w8a8", "w8a8_outlier", "smooth_w8a8", "smooth_w8a8_outlier"]
    word = "holds" if v["holds"] else "fails"
    return {
        "Claim": ({}, ["2022", "2023", "8", "17"]),
        "Ours": (
            _outlier_rows(s, names),
            _llm_run_setup(meta) + _outlier_setup(meta) + ["0.5", "8"],
        ),
        "Agreement": (
            {"recovered": f"recovers {pct(v['recovered'])}% of naive W8A8's loss ({word})"},
            ["0.5", "50", "8"],
        ),
        "Run": ({}, _QUICK_SETUP),
    }


def _quarot_ashkboos2024() -> dict[str, Section]:
    s, meta, verdict, pub = _llm("quarot_ashkboos2024")
    names = ["float", "float_outlier", "w4a4", "w4a4_outlier"] + [
        f"{r}_w4a4{tag}"
        for r in ("rotate", "rotate_online", "rotate_online_random", "quarot")
        for tag in ("", "_outlier")
    ]
    claim = {
        f"v{i}": f"{r['max_wikitext2_ppl_loss_w4a4kv4']:.2f}" for i, r in enumerate(pub["rows"])
    }

    def word(holds: bool) -> str:
        return "holds" if holds else "fails"

    agree = {
        v["base"]: f"{v['base']} model: {v['no_rotation_ppl']:.3f} without, "
        f"{v['rotation_ppl']:.3f} with the residual rotation ({word(v['holds'])}), "
        f"{v['rotate_online_ppl']:.3f} adding the online Hadamard "
        f"({word(v['rotate_online_holds'])}), {v['rotate_online_random_ppl']:.3f} with its "
        f"random signs ({word(v['rotate_online_random_holds'])}), {v['quarot_ppl']:.3f} adding "
        f"the per-head V/O rotation ({word(v['quarot_holds'])})"
        for v in verdict
    }
    return {
        "Claim": (claim, ["2024", "4", "70", "2", "1", "99", "17"]),
        "Ours": (_outlier_rows(s, names), _llm_run_setup(meta) + _outlier_setup(meta)),
        "Agreement": (agree, ["4", "3"]),
        "Run": ({}, _QUICK_SETUP),
    }


# --- the registry ------------------------------------------------------------------------------

PAPERS: dict[str, Callable[[], dict[str, Section]]] = {
    "papers/max1960/README.md": _max1960,
    "papers/sqnr_6db/README.md": _sqnr_6db,
    "papers/aciq_banner2019/README.md": _aciq_banner2019,
    "papers/jacob2018_integer/README.md": _jacob2018_integer,
    "papers/krishnamoorthi2018/README.md": _krishnamoorthi2018,
    "papers/gptq_frantar2022/README.md": _gptq_frantar2022,
    "papers/awq_lin2023/README.md": _awq_lin2023,
    "papers/smoothquant_xiao2022/README.md": _smoothquant_xiao2022,
    "papers/quarot_ashkboos2024/README.md": _quarot_ashkboos2024,
}
CASES = [(doc, h) for doc, fn in PAPERS.items() for h in fn()]


@pytest.mark.parametrize("doc, heading", CASES, ids=[f"{d.split('/')[1]}:{h}" for d, h in CASES])
def test_section_figures_match_results(doc, heading):
    figures, setup = PAPERS[doc]()[heading]
    check_section(doc, heading, figures, setup)


@pytest.mark.parametrize("doc", list(PAPERS))
def test_every_section_is_checked(doc):
    """Each ``##`` section of the README has its figures checked, and nothing is printed
    outside a section (between the title and the first ``##``)."""
    text = (ROOT / doc).read_text()
    heads = re.findall(r"^## (.*?)\s*$", text, flags=re.M)
    assert heads == list(PAPERS[doc]()), doc
    title, _, rest = text.partition("\n## ")
    assert title.count("\n") <= 1, f"{doc}: text before the first section"


# --- README.md § LLM post-training quantization (small GPT) --------------------------------------

LLM_README = "LLM post-training quantization (small GPT)"


def _readme_llm() -> Section:
    g, _, gv, _ = _llm("gptq_frantar2022")
    (g3,) = [v for v in gv if v["bits"] == 3 and v["grouping"] == "per-channel"]
    a, _, av, _ = _llm("awq_lin2023")
    _, _, (sv,), _ = _llm("smoothquant_xiao2022")
    _, _, qv, _ = _llm("quarot_ashkboos2024")
    (qo,) = [v for v in qv if v["base"] == "outlier"]
    (qp,) = [v for v in qv if v["base"] == "plain"]
    awq = " and ".join(f"{v['awq_ppl']:.3f} against {v['rtn_ppl']:.3f}" for v in av)
    clip = " and ".join(f"{v['awq_clip_ppl']:.3f}" for v in av)
    figures = {
        "gptq": f"{g3['gptq_increase']:+.3f} against {g3['rtn_increase']:+.3f} for RTN "
        f"(ratio {g3['ratio']:.2f})",
        "awq": awq,
        "awq clip": f"with its clipping search {clip}",
        "smoothquant": f"recovers {pct(sv['recovered'])}% of naive W8A8's loss "
        f"({sv['naive_increase']:+.3f})",
        "quarot": f"{qo['rotation_ppl']:.3f} against {qo['no_rotation_ppl']:.3f} without",
        "quarot plain": f"on the plain model {qp['quarot_ppl']:.3f} against "
        f"{qp['no_rotation_ppl']:.3f}",
    }
    return figures, ["3", "4", "32"]


def _readme_llm_speed() -> Section:
    """The speed paragraph: benchmarks/gpt_llm.py (whole-model GPTQ time, generation tokens/s
    float against an int8 KV cache); "no difference resolved" needs both CIs to hold 1."""
    llm = load("benchmarks/results/gpt_llm.json")
    gen, q = llm["generation"]["timing"]["variants"], llm["gptq"]

    def ratio(name: str) -> str:
        r = gen[name]["ratio"]
        assert r["ci95"][0] <= 1.0 <= r["ci95"][1], name  # the README says: not resolved
        return f"{r['median']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"

    figures = {
        "speed_load": f"load average {llm['meta']['load_average_before'][0]:.1f} at the start",
        "speed_gptq": f"takes {q['median_seconds']:.1f} s (median of {q['runs']} runs",
        "speed_gptq_first": f"{q['first_run_seconds']:.1f} s for the first",
        "speed_float": f"{gen['float']['tokens_per_s']:.0f} tokens/s in float",
        "speed_per_token": f"{gen['int8_per_token']['tokens_per_s']:.0f} with a",
        "speed_per_channel": f"{gen['int8_per_channel']['tokens_per_s']:.0f} per channel (",
        "speed_ratio_per_token": ratio("int8_per_token"),
        "speed_ratio_per_channel": ratio("int8_per_channel"),
        "speed_rounds": f"{llm['generation']['timing']['rounds']} interleaved rounds",
    }
    layer = load("benchmarks/results/gptq.json")
    jq, npy = (layer["timing"]["variants"][k] for k in ("jquant", "numpy"))
    back = layer["timing_back_to_back"]["variants"]["jquant"]

    def ci(row) -> str:
        r = row["ratio"]
        return f"{r['median']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"

    figures["layer_cmd"] = f"`{layer['meta']['command']}`"
    figures["layer_load"] = f"load {layer['meta']['load_average_before'][0]:.1f} at the start"
    figures["layer_ms"] = (
        f"takes {jq['median_ms']:.0f} ms (median) against {npy['median_ms']:.0f} ms"
    )
    figures["layer_ratio"] = f"{ci(jq)} of NumPy's time"
    figures["layer_verdict"] = f"(<= 0.333x) is {jq['verdict']}"
    figures["layer_back"] = f"when jquant starts: {ci(back)}, {back['verdict']}"
    assert layer["settle_seconds"] > 0  # "each call started from an idle machine"
    shape = layer["shape"]
    layer_setup = [str(shape["inputs"]), str(shape["rows"]), str(shape["block"]), "30"]
    trained = load("benchmarks/results/gpt_train_time.json")
    verdict = "met" if trained["meets_target"] else "missed"
    figures["train"] = f"took {trained['wall_seconds']:.0f} s against the issue's 5-minute "
    figures["train_verdict"] = f"target: {verdict}, in one run"
    figures["train_load"] = f"load average of {trained['load_average_1min_during']['median']:.1f}"
    g = llm["generation"]
    setup = [str(g["new_tokens"]), str(g["prompt"]), str(g["batch"]), "2", "4"]
    return figures, [*setup, *layer_setup, str(trained["recipe"]["steps"]), "5", "1"]


def test_readme_llm_section():
    figures, setup = _readme_llm()
    speed, speed_setup = _readme_llm_speed()
    check_section("README.md", LLM_README, {**figures, **speed}, [*setup, *speed_setup])


def test_gpt_llm_results_are_consistent():
    """gpt_llm.json: tokens/s is batch * new tokens / median time, each ratio's CI holds its
    median, the GPTQ median lies within its runs, and the meta is there."""
    llm = load("benchmarks/results/gpt_llm.json")
    g = llm["generation"]
    assert set(g["timing"]["variants"]) == {"float", "int8_per_token", "int8_per_channel"}
    for row in g["timing"]["variants"].values():
        assert row["tokens_per_s"] == pytest.approx(
            g["batch"] * g["new_tokens"] / (row["median_ms"] / 1e3)
        )
        lo, hi = row["ratio"]["ci95"]
        assert lo <= row["ratio"]["median"] <= hi and row["min_ms"] <= row["median_ms"]
    q = llm["gptq"]
    assert q["min_seconds"] <= q["median_seconds"] <= q["max_seconds"]
    assert len(q["times_seconds"]) == q["runs"] and q["recipe"]["method"] == "gptq"
    assert llm["meta"]["command"].startswith("python benchmarks/gpt_llm.py")
    assert {"load_average_before", "load_average_after", "machine", "date"} <= set(llm["meta"])


def test_gpt_train_time_results_are_consistent():
    """gpt_train_time.json: the verdict follows the wall time and the 300 s target, the
    trainer's own time lies within the wall time, the load was sampled, the meta is there."""
    trained = load("benchmarks/results/gpt_train_time.json")
    assert trained["meets_target"] == (trained["wall_seconds"] <= trained["target_seconds"])
    assert trained["target_seconds"] == 300 and trained["recipe"]["steps"] == 1200
    assert 0 < trained["train_seconds"] <= trained["wall_seconds"]
    samples = trained["load_average_1min_during"]["samples"]
    assert samples and trained["load_average_1min_during"]["median"] == np.median(samples)
    assert trained["meta"]["command"].startswith("python benchmarks/gpt_train_time.py")
