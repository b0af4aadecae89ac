"""The README's Export figures equal the committed benchmark results
(``benchmarks/results/export.json``, written by ``python benchmarks/export.py``).

Sizes are exact (bytes), so their target verdicts follow from the numbers; latency ratios are
printed as ``median x [CI low, CI high]`` (bootstrap 95% CI of the median paired ratio).
"""

from __future__ import annotations

from figures import check_section, load
from test_figures_speed import load_range, ratio

README = "README.md"
EXPORT = "Export"
FILES = {
    "tflite": ".tflite (int8 in and out)",
    "onnx_qoperator": "ONNX QOperator",
    "onnx_qdq": "ONNX QDQ",
    "program": "jquant program file",
}
# batch sizes 1 and 256, the 95% CI level, the 1-minute load average, the 2-core machine
EXPORT_SETUP = ["1", "2", "95", "256"]
BREAKDOWN = ("tflite", "onnx_qoperator", "onnx_qdq")
# README row -> the breakdown keys (of .tflite or ONNX) it sums; the rest is "structure"
ROWS = {
    "weight codes": ("weight codes (int8)",),
    "biases": ("biases (int32)",),
    "weight scales": ("weight scales (float32)",),
    "bias scales": ("bias scales (float32)",),
    "per-channel zero points": ("per-channel zero points (int64)",),
    "activation quantizers": (
        "activation scales (float32)",
        "activation zero points",
        "activation scales and zero points",
    ),
    "names": ("tensor names", "description", "initializer names", "value names"),
    "shapes, tables, tags (structure)": ("shapes (int64)", "structure"),
}


def breakdown_rows(size: dict) -> dict[str, str]:
    """One README table row per part of the files (``-`` where a file has none), and the
    required bytes (floor) with their ratio to float32."""
    rows = {}
    for row, keys in ROWS.items():
        cells = []
        for key in BREAKDOWN:
            n = sum(v for k, v in size["breakdown"][key].items() if k in keys)
            cells.append(f"{n:,}" if n else "-")
        rows[f"breakdown {row}"] = f"| {row} | " + " | ".join(cells) + " |"
    floors = [size["breakdown"][key]["floor"] for key in BREAKDOWN]
    cells = [f"{f['bytes']:,} ({f['ratio']:.3f}x)" for f in floors]
    rows["breakdown floor"] = "| required by the runtime | " + " | ".join(cells) + " |"
    return rows


def export_figures() -> dict[str, str]:
    """Every figure of the README's Export section, from ``export.json``."""
    d = load("benchmarks/results/export.json")
    size = d["size"]
    f = {}
    for key, label in FILES.items():
        row = size["files"][key]
        met = "met" if row["ratio"] <= size["target"] else "not met"
        f[f"size {key}"] = (
            f"| {label} | {row['bytes']:,} | {row['ratio']:.3f}x (target <= "
            f"{size['target']:g}x: {met}) |"
        )
    f |= breakdown_rows(size)
    f["float32 bytes"] = f"{size['float32_bytes']:,} bytes"
    f["weights"] = f"{size['weights']:,} parameters"
    for batch in (1, 256):
        t = d["timing"][f"batch {batch}"]
        v = t["variants"]
        f[f"latency {batch}"] = (
            f"| {batch} | {v['jquant']['median_ms']:.3f} | {v['litert']['median_ms']:.3f} | "
            f"{ratio(v['litert']['ratio'])} |"
        )
    a = d["agreement"]
    f["agreement"] = f"{a['codes_differing']} of {a['codes_total']:,} output codes"
    acc = d["accuracy"]
    assert acc["program"] == acc["litert_xnnpack"]  # the README prints one figure for both
    f["accuracy"] = (
        f"{100 * acc['float']:.1f}% (float) and {100 * acc['program']:.1f}% (program and LiteRT)"
    )
    f["rounds"] = f"{d['config']['rounds']} rounds"
    f["load"] = load_range(d["meta"])
    f["command"] = f"`{d['meta']['command']}`"
    return f


def test_export_section_matches_the_results():
    check_section(README, EXPORT, export_figures(), setup=EXPORT_SETUP)


def test_export_results_carry_their_meta_and_check():
    d = load("benchmarks/results/export.json")
    assert d["meta"]["command"].startswith("python benchmarks/export.py")
    assert not d["meta"]["quick"]
    assert d["agreement"]["codes_differing"] == 0  # LiteRT ran the program's codes
    size = d["size"]
    for key in BREAKDOWN:  # the parts sum to the file; a missed target says why
        parts = size["breakdown"][key]
        assert sum(v for k, v in parts.items() if k != "floor") == size["files"][key]["bytes"]
        assert parts["floor"]["bytes"] == sum(parts.get(k, 0) for k in parts["floor"]["required"])
        assert ("why_not_met" in parts["floor"]) == (not size["files"][key]["target_met"])
    for t in d["timing"].values():
        for row in t["variants"].values():
            lo, hi = row["ratio"]["ci95"]
            assert row["min_ms"] <= row["median_ms"] and lo <= row["ratio"]["median"] <= hi
