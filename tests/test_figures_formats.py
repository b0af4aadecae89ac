"""The README's Formats section equals the committed results of benchmarks/formats.py.

Figures: the block-wise Dense's time ratio to per channel (with its target and verdict), the
block formats' fake-quant time relative to int8, and the table's rows (format, bits, weight
SQNR on the Student-t tensor, MNIST-1D accuracy with quantized weights), each formatted as
printed. ``check_section`` fails when one drifts from the JSON or when the section prints a
number with no results file behind it.
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
    check_section(README, "Formats", formats_figures(), SETUP)
