"""The README's Export figures equal the committed benchmark results
(``benchmarks/results/export.json``, written by ``python benchmarks/export.py``).

Sizes are exact (bytes), so their target verdicts follow from the numbers; latency ratios are
printed as ``median x [CI low, CI high]`` (bootstrap 95% CI of the median paired ratio). The
sweep over model width (``size_vs_width``) is checked against the architecture's shapes and
the closed-form floors (``W + b C + z D`` bytes) computed here from the dtypes.
"""

from __future__ import annotations

import math

import numpy as np
from figures import check_section, load
from test_figures_speed import load_range, ratio

from jquant.models import model_config

README = "README.md"
EXPORT = "Export"
FILES = {
    "tflite": ".tflite (int8 in and out)",
    "onnx_qoperator": "ONNX QOperator",
    "onnx_qdq": "ONNX QDQ",
    "program": "jquant program file",
}
# batch sizes 1 and 256, the 95% CI level, the 1-minute load average, the 2-core machine; 4
# bytes per float32 weight
EXPORT_SETUP = ["1", "2", "4", "95", "256"]
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


# the sweep's files as its table's last column names them
SWEEP_FILES = {
    "tflite": ".tflite",
    "onnx_qoperator": "QOperator",
    "onnx_qdq": "QDQ",
    "program": "program",
}
# bytes each runtime requires per output channel (int32 bias, float32 weight scale, float32
# bias scale) and per entry of a distinct per-channel zero-point vector (the .tflite's int64)
I32, F32, I64 = (np.dtype(t).itemsize for t in (np.int32, np.float32, np.int64))
PER_CHANNEL = {"tflite": I32 + 2 * F32, "onnx_qoperator": I32 + F32, "onnx_qdq": I32 + 2 * F32}
PER_DISTINCT_CHANNEL = {"tflite": I64, "onnx_qoperator": 0, "onnx_qdq": 0}
MNIST1D_INPUT = (40, 1)  # MNIST-1D signals: 40 samples, one channel; 10 classes


def sweep_figures(d: dict) -> dict[str, str]:
    """The figures of the README's width sweep, from ``export.json``'s ``size_vs_width``."""
    s = d["size_vs_width"]
    rows = s["rows"]
    assert rows[0]["width"] == 1 and rows[0]["size"] == d["size"]
    f = {
        "sweep 1x is main": "the 1x row is the trained model's",
        "sweep target": f"| <= {s['target']:g}x |",
    }
    for row in rows:
        size = row["size"]
        cells = []
        for key in SWEEP_FILES:
            cell = f"{size['files'][key]['ratio']:.3f}x"
            if key in size["breakdown"]:
                cell += f" ({size['breakdown'][key]['floor']['ratio']:.3f}x)"
            cells.append(cell)
        met = [name for key, name in SWEEP_FILES.items() if size["files"][key]["target_met"]]
        verdict = "all four" if len(met) == len(SWEEP_FILES) else ", ".join(met) or "none"
        f[f"sweep {row['width']}x"] = (
            f"| {row['width']}x | {row['weights']:,} | {row['fan_in']:,.0f} | "
            + " | ".join(cells)
            + f" | {verdict} |"
        )
    m = rows[0]["model"]
    f["sweep b"] = (
        f"{m['tflite']['b']} bytes in the .tflite, {m['onnx_qoperator']['b']} bytes in "
        f"QOperator, {m['onnx_qdq']['b']} bytes in QDQ"
    )
    f["sweep z"] = f"z = {m['tflite']['z']}"
    f["sweep 1x needs"] = (
        f"At 1x (F = {rows[0]['fan_in']:.0f}) its metadata and structure would need "
        f"F >= {m['tflite']['min_fan_in']:.0f} for the .tflite and "
        f"F >= {m['onnx_qdq']['min_fan_in']:.0f} for QDQ"
    )
    assert not all(rows[0]["size"]["files"][k]["target_met"] for k in SWEEP_FILES)
    first = next(r for r in rows if all(r["size"]["files"][k]["target_met"] for k in SWEEP_FILES))
    f["sweep all met"] = f"at {first['width']}x (F = {first['fan_in']:.0f}) every file meets it"
    return f


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
    return f | sweep_figures(d)


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


def test_export_size_sweep_adds_up_and_follows_the_closed_form():
    """Each width's sizes add up, its ratios and verdicts follow from the bytes, its counts are
    the architecture's, and the required bytes equal ``W + b C + z D`` with ``b`` and ``z``
    from the dtypes; the 1x row is the main measurement."""
    d = load("benchmarks/results/export.json")
    s = d["size_vs_width"]
    assert s["meta"]["command"].startswith("python benchmarks/export.py")
    assert s["meta"]["date"] and s["target"] == d["size"]["target"]
    rows = s["rows"]
    assert [r["width"] for r in rows] == sorted({1, *(r["width"] for r in rows)})
    assert len(rows) >= 3 and rows[0]["size"] == d["size"]
    base = model_config("cnn", MNIST1D_INPUT, 10)
    for row in rows:
        k, size = row["width"], row["size"]
        features = [k * c for c in base.features]
        dense = [k * c for c in base.dense]
        assert row["features"] == features and row["dense"] == dense
        taps = math.prod(base.kernel_size)
        flat = MNIST1D_INPUT[0] // base.pool_size ** len(features) * features[-1]
        ins, outs = [MNIST1D_INPUT[-1], *features[:-1], flat, *dense], [*features, *dense, 10]
        layers = enumerate(zip(ins, outs, strict=True))
        W = sum(i * o * (taps if n < len(features) else 1) for n, (i, o) in layers)
        C, D = sum(outs), sum(set(outs))
        assert row["counts"] == dict(W=W, C=C, D=D) and size["weights"] == W + C
        assert row["fan_in"] == W / C
        float_bytes, t = size["float32_bytes"], size["target"]
        h = float_bytes - 4 * (W + C)  # the safetensors header
        assert 0 < h < 2_000
        for file in size["files"].values():
            assert file["ratio"] == file["bytes"] / float_bytes
            assert file["target_met"] == (file["ratio"] <= t)
        for key in BREAKDOWN:
            parts, file, m = size["breakdown"][key], size["files"][key], row["model"][key]
            floor = parts["floor"]
            assert sum(v for p, v in parts.items() if p != "floor") == file["bytes"]
            assert floor["bytes"] == sum(parts.get(p, 0) for p in floor["required"])
            assert floor["ratio"] == floor["bytes"] / float_bytes
            assert ("why_not_met" in floor) == (not file["target_met"])
            b, z = PER_CHANNEL[key], PER_DISTINCT_CHANNEL[key]
            assert (m["b"], m["z"]) == (b, z)
            assert floor["bytes"] == W + b * C + z * D == m["floor"]
            rest = file["bytes"] - floor["bytes"]
            assert m["rest"] == rest and math.isclose(m["ratio"], file["ratio"], rel_tol=1e-12)
            want = (b - 4 * t + z * D / C + (rest - t * h) / C) / (4 * t - 1)
            assert math.isclose(m["min_fan_in"], want, rel_tol=1e-12)
            assert m["met"] == (W / C >= want) == file["target_met"]
    # the metadata is amortized: every ratio falls with the width
    for key in SWEEP_FILES:
        ratios = [r["size"]["files"][key]["ratio"] for r in rows]
        assert ratios == sorted(ratios, reverse=True)
