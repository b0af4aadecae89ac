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
    "dynamic min/max per example and position (STE); LSQ weight steps from "
    "2 mean|w| / sqrt(Q_P), relative rate 1e-2; distillation 0.5": (
        "dynamic min/max per example and position; weights LSQ (paper initialisation), "
        "distilled from the float model"
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

METHODS = ("ste", "pact", "lsq")
WIDTHS = (2, 3, 4, 8)


def _rows(name: str) -> list[dict]:
    return load(f"{LSQ}/{name}.json")["rows"]


def _one(rows: list[dict], **where) -> dict:
    (r,) = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return r


def _runs() -> list[dict]:
    return _rows("lsq_pact_qat_runs") + _rows("lsq_pact_ablation_runs")


def _selected(bits: int, method: str) -> dict:
    """The summary row of ``method`` at ``bits`` (``lsq_act`` from the ablation's table)."""
    name = "lsq_pact_ablation_qat" if method == "lsq_act" else "lsq_pact_qat"
    return _one(_rows(name), bits=bits, method=method)


def _selected_runs(bits: int, method: str, value: str = "qat") -> np.ndarray:
    """``value`` of the 3 runs at the selected rate, from the runs files."""
    lr = _selected(bits, method)["lr"]
    a = np.array(
        [r[value] for r in _runs() if (r["bits"], r["method"], r["lr"]) == (bits, method, lr)]
    )
    assert len(a) == 3
    return a


def _pm(a: np.ndarray) -> str:
    return pm(a.mean(), a.std(ddof=1))


def _diff(d: float) -> str:
    """A difference of fractions in points, signed, one decimal: 0.147 -> ``+14.7``; ``0.0``
    unsigned."""
    out = f"{100 * d:+.1f}"
    return "0.0" if out in ("+0.0", "-0.0") else out


def _float_models() -> str:
    by_seed = {r["seed"]: r["float"] for r in _rows("lsq_pact_qat_runs")}
    assert sorted(by_seed) == [0, 1, 2]
    return _pm(np.array(list(by_seed.values())))


def _pair(bits: int, pair: str, lr: float | None = None) -> dict:
    if lr is None:
        name = "lsq_pact_ablation_paired" if "lsq_act" in pair else "lsq_pact_qat_paired"
        return _one(_rows(name), bits=bits, pair=pair)
    return _one(_rows("lsq_pact_controls_paired"), bits=bits, pair=pair, lr=lr)


def _control(bits, method: str, lr: float) -> dict:
    return _one(_rows("lsq_pact_controls"), bits=bits, method=method, lr=lr)


def _slash(values) -> str:
    return " / ".join(values)


# --- README.md § Papers -------------------------------------------------------------------------


def _readme_papers() -> Section:
    figures = {"lsq_pact float": f"float models: {_float_models()}"}
    for b in WIDTHS:
        figures[f"lsq_pact {b}"] = table_row(str(b), *(_pm(_selected_runs(b, m)) for m in METHODS))
    d = [_diff(_pair(b, "lsq-pact")["diff_mean"]) for b in WIDTHS]
    figures["lsq-pact"] = f"LSQ - PACT, paired by seed: {_slash(d)} points at 2 / 3 / 4 / 8 bits"
    ctrl = [_diff(_pair(b, "lsq-pact", 0.03)["diff_mean"]) for b in WIDTHS]
    figures["controls"] = f"LSQ still leads PACT by {_slash(ctrl)} points"
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
    # quantized_training: every product quantized, trained from scratch (3 seeds)
    qt = load("papers/quantized_training/results/quantized_training.json")["summary"]
    qt = {r["recipe"]: pct(r["acc_mean"]) for r in qt}
    figures["qt int8"] = f"{qt['int8_grad_stochastic']}% against {qt['float']}% for float"
    figures["qt fp8"] = f"delayed scaling {qt['fp8_delayed']}%"
    figures["qt int4 stochastic"] = f"{qt['int4_grad_stochastic']}% with stochastic rounding"
    figures["qt int4 nearest"] = f"{qt['int4_grad_nearest']}% with round-to-nearest"
    # quantized_training on the zoo GPT: validation loss and gap to float (3 seeds)
    gpt = load("papers/quantized_training/results/quantized_training_gpt.json")
    loss = {r["recipe"]: r for r in gpt["summary"]}
    assert all(r["seeds"] == 3 for r in loss.values())
    figures["qt gpt fp8"] = (
        f"delayed scaling ends at a validation loss of {loss['fp8_delayed']['val_loss_mean']:.3f} "
        f"against {loss['float']['val_loss_mean']:.3f} for float "
        f"({loss['fp8_delayed']['gap_percent']:+.2f}%"
    )
    figures["qt gpt fp8 current"] = f"current scaling {loss['fp8_current']['gap_percent']:+.2f}%"
    figures["qt gpt int4"] = (
        f"int4 gradients at {loss['int4_grad_nearest']['val_loss_mean']:.3f} "
        f"({loss['int4_grad_nearest']['gap_percent']:+.1f}%)"
    )
    proto = gpt["protocol"]
    figures["qt gpt setup"] = f"({proto['num_layers']} blocks of width {proto['width']}, "
    figures["qt gpt steps"] = f"{proto['steps']} steps"
    setup = [
        "0",
        "1",
        "2",
        "3",
        "4",
        "8",
        "300",
        "800",
        "6",
        "0.03",
        "0.1",
        "1000x",
    ]  # 1000x: the injected channel-range ratio
    return figures, setup


def test_readme_papers():
    check_section("README.md", "Papers", *_readme_papers(), own=True)  # subsections: own tests


# --- papers/lsq_pact/README.md, section by section ----------------------------------------------

DOC = "papers/lsq_pact/README.md"


def _claims() -> Section:
    return {}, ["2019", "2018", "2020", "3", "2.2", "0", "7"]


def _gradients() -> Section:
    g = _rows("lsq_pact_gradients")
    assert [r["bits"] for r in g] == list(WIDTHS) and {r["elements"] for r in g} == {10_000}
    (lsq_clip,) = {r["lsq_clipped_fraction"] for r in g}
    (pact_clip,) = {r["pact_clipped_fraction"] for r in g}
    figures = {
        "clipped": f"{100 * lsq_clip:.0f} % (LSQ) and {100 * pact_clip:.0f} % (PACT)",
        "elements": "(10,000 elements)",
    }
    for r in g:
        assert r["lsq_max_abs_diff"] < 1e-7  # float32 rounding of the closed form
        lsq = f"{r['lsq_max_abs_diff']:.1e}".replace("e-0", "e-")
        figures[f"bits {r['bits']}"] = table_row(str(r["bits"]), lsq, f"{r['pact_max_abs_diff']:g}")
    return figures, ["2", "3", "4", "8", "0", "4", "32"]


def _protocol() -> Section:
    setup = [
        "500", "4,000", "600", "3,500", "0", "1", "2", "1,000", "3", "4", "8", "1", "0.9", "300",
        "128", "0.01", "0.03", "0.1",
    ]  # fmt: skip
    return {}, setup


def _results() -> Section:
    figures = {"float": f"The float models score {_float_models()}."}
    label = {"lsq_act": "lsq_act (ablation)"}
    for b in WIDTHS:
        for m in (*METHODS[:2], "lsq_act", "lsq"):
            if m == "lsq_act" and b not in (2, 3):
                continue
            s = _selected(b, m)
            lr = f"{s['lr']:g}" + (" (carried)" if b in (4, 8) else "")
            ptq, qat = _selected_runs(b, m, "ptq"), _selected_runs(b, m)
            assert s["val_mean"] == pytest.approx(_selected_runs(b, m, "val").mean())
            figures[f"{b} {m}"] = table_row(
                str(b), label.get(m, m), lr, pct(s["val_mean"]), _pm(ptq), _pm(qat)
            )
        cells = []
        for pair in ("lsq-pact", "pact-ste", "lsq-ste", "lsq_act-pact", "lsq-lsq_act"):
            if "lsq_act" in pair and b not in (2, 3):
                cells.append("")
                continue
            p = _pair(b, pair)
            cells.append(f"{_diff(p['diff_mean'])} +- {pct(p['diff_std'])} (t {p['t']:.1f})")
        figures[f"paired {b}"] = table_row(str(b), *cells)
    lsq8 = ", ".join(pct(x) for x in _selected_runs(8, "lsq"))
    figures["lsq8"] = f"({lsq8} %;"
    return figures, ["0", "1", "2", "3", "4", "8", "4.3", "0.05"]


def _rate_label(rate_of: str, lr: float) -> str:
    return f"{lr:g} ({rate_of.replace(',', ', ')})"


def _controls() -> Section:
    figures = {}
    rates = sorted({r["lr"] for r in _rows("lsq_pact_controls")})
    for b in WIDTHS:
        for lr in rates:
            c = {m: _control(b, m, lr) for m in METHODS}
            (rate_of,) = {x["rate_of"] for x in c.values()}
            d = [_pair(b, p, lr) for p in ("lsq-pact", "lsq-ste")]
            figures[f"{b} {lr}"] = table_row(
                str(b),
                _rate_label(rate_of, lr),
                *(pm(c[m]["qat_mean"], c[m]["qat_std"]) for m in METHODS),
                *(f"{_diff(p['diff_mean'])} +- {pct(p['diff_std'])}" for p in d),
            )
    for lr in rates:
        f = _control(None, "float", lr)
        vs = _slash(_diff(_pair(b, "lsq-float", lr)["diff_mean"]) for b in WIDTHS)
        figures[f"float {lr}"] = table_row(
            _rate_label(f["rate_of"], lr), pm(f["qat_mean"], f["qat_std"]), vs
        )
    lo, hi = rates
    sel = {b: _pair(b, "lsq-pact")["diff_mean"] for b in WIDTHS}
    ctrl = {b: _pair(b, "lsq-pact", lo)["diff_mean"] for b in WIDTHS}
    figures["ctrl"] = (
        f"beats PACT by {_slash(_diff(ctrl[b]) for b in WIDTHS)} points at 2 / 3 / 4 / 8"
    )
    figures["sel"] = f"(against {_slash(_diff(sel[b]) for b in WIDTHS)} with"
    share = max(sel[b] - ctrl[b] for b in (2, 3))
    figures["share"] = f"at most {pct(share)} points"
    ste_min, pact_min = (_control(3, m, hi)["qat_min"] for m in ("ste", "pact"))
    figures["mins"] = f"{pct(ste_min)} % for STE, {pct(pact_min)} % for PACT"
    f_hi = _control(None, "float", hi)
    figures["float ft"] = (
        f"scores {pm(f_hi['qat_mean'], f_hi['qat_std'])} (the float models: {_float_models()})"
    )
    gap = max(abs(_pair(b, "lsq-float", hi)["diff_mean"]) for b in (2, 3, 4))
    figures["lsq vs float"] = f"within\n  {pct(gap)} points"
    eight = max(abs(_pair(8, f"{m}-float", lo)["diff_mean"]) for m in METHODS)
    figures["eight"] = f"(within\n  {pct(eight)} points)"
    ste8 = _control(8, "ste", hi)
    figures["ste8"] = f"STE reaches {pm(ste8['qat_mean'], ste8['qat_std'])}"
    return figures, ["2", "3", "4", "8", "0.03", "0.1"]


def _verdict() -> Section:
    def at(pair, widths):
        return _slash(_diff(_pair(b, pair)["diff_mean"]) for b in widths)

    figures = {
        "act-pact": f"is {at('lsq_act-pact', (2, 3))} points above PACT",
        "lsq-act": f"adds {at('lsq-lsq_act', (2, 3))} more",
        "pact-ste": f"PACT - STE is {at('pact-ste', (2, 3))} points",
        "lead": f"({at('lsq-pact', WIDTHS)} points at 2 / 3 / 4 / 8 bits)",
    }
    for b in (2, 3):
        assert abs(_pair(b, "pact-ste")["t"]) < 1
    for b in (2, 3, 4):  # "on every seed"
        assert _pair(b, "lsq-pact")["diff_min"] > 0
    return figures, ["2", "3", "4", "8", "1", "50", "7"]


def _caveats() -> Section:
    return {}, ["300", "1500", "2", "4"]


def _published() -> Section:
    pub = load(f"{LSQ}/published.json")
    assert "find_string id 54537679452" in pub["source"]
    figures = {}
    for r in pub["rows"]:
        cells = [r[k] for k in ("full_precision", "bits_2", "bits_3", "bits_4", "bits_8")]
        figures[f"{r['network']} {r['method']}"] = table_row(
            r["network"], r["method"], *("" if v is None else f"{v:.1f}" for v in cells)
        )
    lsq, pact = (_one(pub["rows"], network="ResNet-50", method=m) for m in ("LSQ", "PACT"))
    diffs = _slash(f"{lsq[k] - pact[k]:.1f}" for k in ("bits_2", "bits_3", "bits_4"))
    figures["diffs"] = f"by {diffs} points at 2 / 3 / 4 bits"
    return figures, ["1", "2", "3", "4", "8", "2020", "18", "50"]


def _cost() -> Section:
    meta = load(f"{LSQ}/lsq_pact_qat.json")["meta"]
    ablation = load(f"{LSQ}/lsq_pact_ablation_qat.json")["meta"]
    figures = {
        "main": f"took {minutes(float(meta['wall_s']))} wall",
        "load": (
            f"load average {float(meta['load_1min_start']):.1f} at the start, "
            f"{float(meta['load_1min_end']):.1f} at the end"
        ),
        "ablation": f"took {minutes(float(ablation['wall_s']))} more",
    }
    assert meta["cpus"] == "2"
    return figures, ["2", "3", "4", "8", "1"]


SECTIONS = {
    "Claims": _claims,
    "1. Gradients against the closed forms": _gradients,
    "2. QAT on MNIST-1D: the protocol": _protocol,
    "3. Results": _results,
    "4. Matched-rate controls: estimator or learning rate?": _controls,
    "5. Verdict": _verdict,
    "6. Caveats": _caveats,
    "7. Published tables": _published,
    "8. Cost and how to run": _cost,
}


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_lsq_pact_readme(heading):
    check_section(DOC, heading, *SECTIONS[heading]())


def test_lsq_pact_readme_has_no_figure_outside_its_sections():
    # the whole document: every section's figures and setup, nothing else (the title's years,
    # the sections' numbers)
    figures, setup = {}, {"2019", "2018", *(str(i) for i in range(1, len(SECTIONS)))}
    for heading, make in SECTIONS.items():
        f, s = make()
        figures |= {f"{heading}: {k}": v for k, v in f.items()}
        setup |= set(s)
    title = (
        "LSQ (Esser et al. 2019) and PACT (Choi et al. 2018): learned-range gradients and a "
        "fair QAT comparison"
    )
    check_section(DOC, title, figures, setup)
