"""Every figure in README.md's ``QAT on MNIST-1D`` and ``Papers`` sections and in
papers/lsq_pact/README.md (section by section) against the committed results files.

Each ``_<section>`` function computes the figures its section prints from the results JSON
(formatted to the printed precision) and lists the numbers that are setup (widths, seeds, step
counts); :func:`figures.check_section` fails when a figure drifts from its results or the
section prints a number with nothing behind it. Published numbers come from the committed
transcription ``papers/lsq_pact/results/published.json``, which names its source. Nothing is
rerun here: this reads files only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pytest
from figures import check_section, load

Section = tuple[Mapping[str, str], Iterable[str]]  # (figures, setup)

MNIST = "benchmarks/results/mnist1d_qat.json"
LSQ = "papers/lsq_pact/results"


def pct(x: float) -> str:
    """A fraction in percent to one decimal: 0.9323 -> ``93.2``."""
    return f"{100 * x:.1f}"


def pm(mean: float, std: float) -> str:
    """Fractions as ``mean +- std`` in percent, one decimal each."""
    return f"{pct(mean)} +- {pct(std)}"


def minutes(seconds: float) -> str:
    """Wall time as printed: 735 -> ``12 min 15 s``."""
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def table_row(*cells: str) -> str:
    """A markdown table row ``| a | b | ... |``."""
    return "| " + " | ".join(cells) + " |"


# --- README.md § QAT on MNIST-1D ---------------------------------------------------------------

# the JSON's description of each row's scales -> the README's wording
SCALES = {
    None: "no quantization",
    "min/max calibrated static ranges (8 batches), no training": (
        "min/max calibrated, static (8 batches)"
    ),
    "LSQ: learned step sizes initialised from min/max calibration (8 batches); activation "
    "zero points fixed at calibration": (
        "learned steps from min/max calibration (8 batches); zero points fixed"
    ),
}
ESTIMATOR = {None: "none (no training)", "lsq": "LSQ"}  # of the quantized rows


def _readme_qat() -> Section:
    d = load(MNIST)
    assert d["quick"] is False and d["seeds"] == [0, 1, 2]
    assert d["command"] == "python -m jquant.examples.mnist1d_qat --seeds 3"
    figures = {
        "wall": minutes(d["wall_s"]),
        "load": f"load average {d['load_1min_start']:.1f} at the start",
        "float steps": f"{d['float_steps']} Adam steps",
        "qat steps": f"{d['qat_steps']} QAT steps",
    }
    for r in d["rows"]:
        a = np.asarray(r["per_seed"], np.float64)
        assert len(a) == 3
        assert r["mean"] == pytest.approx(a.mean()) and r["std"] == pytest.approx(a.std(ddof=1))
        est = "no quantization" if r["name"] == "float" else ESTIMATOR[r["estimator"]]
        figures[r["name"]] = table_row(
            r["label"], est, SCALES[r["activation_scales"]], pm(a.mean(), a.std(ddof=1))
        )
    return figures, ["0", "1", "2", "3", "128", "8"]


def test_readme_qat_on_mnist1d():
    check_section("README.md", "QAT on MNIST-1D", *_readme_qat())


# --- papers/lsq_pact results, shared by README.md § Papers and papers/lsq_pact/README.md ------


def _rows(name: str) -> list[dict]:
    return load(f"{LSQ}/{name}.json")["rows"]


def _one(rows: list[dict], **where) -> dict:
    (r,) = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return r


def _qat(bits: int, method: str) -> str:
    """``mean +- std`` of the selected runs' QAT test accuracy, from the runs file."""
    runs = _rows("lsq_pact_qat_runs") + _rows("lsq_pact_ablation_runs")
    s = _one(_rows("lsq_pact_ablation_qat"), bits=bits, method=method)
    a = np.array(
        [r["qat"] for r in runs if (r["bits"], r["method"], r["lr"]) == (bits, method, s["lr"])]
    )
    assert len(a) == 3 and s["qat_mean"] == pytest.approx(a.mean())
    return pm(a.mean(), a.std(ddof=1))


def _diff(d: float) -> str:
    """A difference of fractions in points, signed, one decimal: 0.147 -> ``+14.7``."""
    return f"{100 * d:+.1f}"


# --- README.md § Papers -------------------------------------------------------------------------


def _readme_papers() -> Section:
    figures = {}
    fl = np.array(
        [
            r["float"]
            for r in _rows("lsq_pact_qat_runs")
            if (r["bits"], r["method"], r["lr"]) == (2, "ste", 0.03)
        ]
    )
    figures["lsq_pact float"] = f"float models: {pm(fl.mean(), fl.std(ddof=1))}"
    for b in (2, 3, 4, 8):
        figures[f"lsq_pact {b}"] = table_row(str(b), *(_qat(b, m) for m in ("ste", "pact", "lsq")))
    paired = _rows("lsq_pact_qat_paired")
    d = {b: _diff(_one(paired, bits=b, pair="lsq-pact")["diff_mean"]) for b in (2, 3, 4, 8)}
    figures["lsq-pact"] = f"{d[2]} points at 2 bits, {d[3]} at 3, {d[4]} at 4, {d[8]} at 8"
    # jacob2018_integer: BN folded QAT, integer-only program (3 seeds)
    jac = load("papers/jacob2018_integer/results/qat_bn_folding.json")["rows"]
    assert len(jac) == 3
    mean = {k: np.mean([r[k] for r in jac]) for k in ("integer_only", "qat_folded_bn", "float")}
    figures["jacob integer"] = f"scores {pct(mean['integer_only'])}%"
    assert pct(mean["qat_folded_bn"]) == pct(mean["float"])
    figures["jacob fake quant"] = (
        f"against {pct(mean['qat_folded_bn'])}% for the fake-quant model and for float"
    )
    # krishnamoorthi2018: per-channel 8-bit PTQ and the per-layer collapse, MNIST-1D
    k = load("papers/krishnamoorthi2018/results/krishnamoorthi2018.json")["rows"]
    pc = _one(k, dataset="mnist1d", table="table3", column="sym per-channel")
    figures["krishnamoorthi per-channel"] = (
        f"scores {pct(pc['quantized_mean'])}% against {pct(pc['float_mean'])}% for float"
    )
    before = _one(k, dataset="mnist1d", table="collapse", column="asym per-layer")
    after = _one(k, dataset="mnist1d", table="collapse", column="asym per-layer rescaled")
    figures["krishnamoorthi collapse"] = (
        f"({pct(before['quantized_mean'])}% to {pct(after['quantized_mean'])}%)"
    )
    setup = ["0", "1", "2", "3", "4", "8", "300", "6"]
    return figures, setup


def test_readme_papers():
    check_section("README.md", "Papers", *_readme_papers())
