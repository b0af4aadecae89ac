"""The README's Formats section equals the committed results of benchmarks/formats.py and
benchmarks/act_blocks.py.

Figures: the block-wise Dense's time ratio to per channel (with its target and verdict), the
block formats' fake-quant time relative to int8, and the table's rows (format, bits, weight
SQNR on the Student-t tensor, MNIST-1D accuracy with quantized weights), each formatted as
printed; then, from benchmarks/act_blocks.py, the block-wise activation table's rows (MNIST-1D
accuracy per granularity and range), its float accuracy and the int-vs-simulate logit gap.
``check_section`` fails when one drifts from the JSON or when the section prints a number
with no results file behind it.
"""

from __future__ import annotations

from figures import check_section, load
from test_figures_speed import judged, load_range, ratio

README = "README.md"
RESULTS = "benchmarks/results/formats.json"
TABLE_BITS = (2, 4, 8)  # the integer widths the table shows; block formats have one each
# setup: blocks of 32 / 128 and 16 / 64, the Student-t's 3 degrees of freedom, the tensor's and
# the Dense's shapes, test examples, the 1.3x target (printed again inside the judged ratio),
# the machine's 2 cores
SETUP = ["32", "128", "16", "64", "3", "1024", "256", "1000", "1.3", "2"]


def table_rows(d: dict) -> dict[str, str]:
    """``| format | bits | SQNR dB | accuracy % |`` for each shown row, keyed by label."""
    sqnr = {(r["format"], r["bits"]): r["sqnr_db"] for r in d["weight_sqnr"]["rows"]}
    rows = {}
    for r in d["mnist1d_accuracy"]["rows"]:
        integer = r["format"].startswith("int ")
        if integer and r["bits"] not in TABLE_BITS:
            continue
        key = (r["format"], r["bits"])
        rows[f"{key}"] = (
            f"| {r['format']} | {r['bits']} | {sqnr[key]:.1f} | {100 * r['accuracy']:.1f} |"
        )
    return rows


def formats_figures() -> dict[str, str]:
    d = load(RESULTS)
    dense = d["dense_fwd_bwd"]["timing"]["variants"]["per_block32"]
    fq = d["fake_quant_throughput"]["timing"]["variants"]
    f = {"dense": judged(dense), "float": f"{100 * d['mnist1d_accuracy']['float_accuracy']:.1f}%"}
    f |= {
        f"fq_{name}": ratio(fq[name]["ratio"]) for name in ("mxfp8_e4m3", "mxfp4", "nvfp4", "nf4")
    }
    f["load"] = load_range(d["meta"])
    return f | table_rows(d)


def test_formats_section_matches_results():
    check_section(README, "Formats", formats_figures() | act_block_figures(), SETUP + ACT_SETUP)


ACT_RESULTS = "benchmarks/results/act_blocks.json"
ACT_COLUMNS = ("minmax", "percentile", "mse", "dynamic_per_token")
# setup of the block-wise activation paragraph: the block of 8 features, 512 calibration examples
ACT_SETUP = ["8", "512"]


def act_block_figures() -> dict[str, str]:
    """The block-wise activation table (a row per granularity, a column per range), the float
    accuracy and the int-vs-simulate logit gap, from ``benchmarks/act_blocks.py``'s results."""
    d = load(ACT_RESULTS)["mnist1d_accuracy"]
    acc = {(r["granularity"], r["calibration"]): r["accuracy"] for r in d["rows"]}
    f = {
        "act_float": f"(float model: {100 * d['float_accuracy']:.1f}%)",
        "act_gap": f"within {d['int_vs_simulate_max_abs_logit']:.1e} of",
        "act_header": f"| activation scales | {' | '.join(ACT_COLUMNS)} |",
    }
    for granularity in dict.fromkeys(g for g, _ in acc):
        cells = " | ".join(f"{100 * acc[(granularity, c)]:.1f}" for c in ACT_COLUMNS)
        f[f"act_{granularity}"] = f"| {granularity} | {cells} |"
    return f
