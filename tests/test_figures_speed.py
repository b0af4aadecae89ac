"""The README's speed figures equal the committed benchmark results (benchmarks/results/).

Each figure is computed here from a results JSON and formatted as the README prints it: a
ratio as ``median x [CI low, CI high]`` (bootstrap 95% CI of the median paired ratio), with
``(target <= t: verdict)`` where the benchmark sets a target. ``check_section`` fails when a
figure drifts from its JSON, or when the section prints a number with no results file behind
it.
"""

from __future__ import annotations

from typing import Any

import pytest
from figures import check_section, load

from jquant.bench import VERDICTS, verdict

README = "README.md"
SPEED = "Speed"
COMPARED = "Compared with AQT, Qwix and TFLite (measured here, not claimed)"
TRAIN_STEP = "Training step with quantized backward products"


def ratio(r: dict[str, Any]) -> str:
    """``median x [low, high]`` of a ratio (a variant's ``ratio`` or a pair)."""
    lo, hi = r["ci95"]
    return f"{r['median']:.2f}x [{lo:.2f}, {hi:.2f}]"


def judged(row: dict[str, Any], r: dict[str, Any] | None = None) -> str:
    """The ratio with its target and verdict, e.g. ``1.01x [0.95, 1.08] (target <= 1.15: met)``."""
    sign = "<=" if row["lower_is_better"] else ">="
    return f"{ratio(r or row['ratio'])} (target {sign} {row['target']:g}: {row['verdict']})"


def load_range(meta: dict[str, Any]) -> str:
    """The 1-minute load average before and after a run, e.g. ``load 3.1 to 4.2``."""
    a, b = meta["load_average_before"][0], meta["load_average_after"][0]
    return f"load {min(a, b):.1f} to {max(a, b):.1f}"


def _ops() -> tuple[dict, dict[tuple[str, str], dict]]:
    d = load("benchmarks/results/ops.json")
    return d, {(c["op"], c["passes"]): c["timing"]["variants"] for c in d["cases"]}


def speed_figures() -> dict[str, str]:
    """Every figure of the README's Speed section, from the results files."""
    f = {}
    ops_json, ops = _ops()
    for op in ("conv", "dense"):
        f[f"simulate {op} fwd+bwd"] = judged(ops[op, "fwd+bwd"]["simulate"])
        f[f"int {op} fwd+bwd"] = ratio(ops[op, "fwd+bwd"]["int"]["ratio"])
    f["int conv fwd"] = judged(ops["conv", "fwd"]["int"])
    f["int_static conv fwd"] = ratio(ops["conv", "fwd"]["int_static"]["ratio"])
    f["lax_int8 conv fwd"] = ratio(ops["conv", "fwd"]["lax_int8"]["ratio"])
    f["int conv1d fwd"] = ratio(ops["conv1d", "fwd"]["int"]["ratio"])
    f["lax_int8 conv1d fwd"] = ratio(ops["conv1d", "fwd"]["lax_int8"]["ratio"])
    f["ops rounds"] = f"{ops_json['config']['rounds']} rounds"
    f["ops load"] = load_range(ops_json["meta"])

    ts = load("benchmarks/results/train_step.json")
    tv = ts["timing"]["variants"]
    f["train simulate"] = judged(tv["simulate"])
    for name in ("int", "qwix_int8_static", "qwix_int8"):
        f[f"train {name}"] = ratio(tv[name]["ratio"])
    (pair,) = ts["pairs"]
    f["train int vs qwix static"] = judged(pair, pair)
    f["train rounds"] = f"{ts['timing']['rounds']} rounds"
    f["train load"] = load_range(ts["meta"])

    it = load("benchmarks/results/integer.json")
    iv = it["timing"]["variants"]
    for m in ("double", "single", "fp32"):
        f[f"int {m}"] = judged(iv[f"int {m}"])
        f[f"int {m} e2e"] = judged(iv[f"int {m} e2e"])
    size = it["size"]
    met = "met" if size["ratio"] <= size["target"] else "not met"  # sizes are exact
    f["integer size"] = (
        f"{size['ratio']:.3f}x the float checkpoint (target <= {size['target']:g}x: {met})"
    )
    agree = {a["argmax_vs_simulation"] for a in it["agreement"].values()}
    assert len(agree) == 1, agree  # one figure for every mode
    f["integer agreement"] = f"{100 * agree.pop():.0f}% in every mode"
    fq = [100 * it["agreement"][m]["argmax_vs_fake_quant"] for m in ("double", "single", "fp32")]
    f["integer vs fake-quant"] = f"{fq[0]:.1f}% / {fq[1]:.1f}% / {fq[2]:.1f}%"
    f["integer rounds"] = f"{it['config']['rounds']} rounds"
    f["integer load"] = load_range(it["meta"])

    sw = load("benchmarks/results/sweep.json")
    for where, d in (("tensor", sw), ("model", sw["model_sweep"])):
        for pair_name in ("cold", "warm"):
            f[f"{where} sweep {pair_name}"] = ratio(d[pair_name]["speedup"])
        f[f"{where} sweep peak"] = f"{d['peak_chunk1_vs_one_width']:.2f}x one width"
    f["sweep load"] = load_range(sw["meta"])

    cal = load("benchmarks/results/calibration.json")
    for pair_name in ("cold", "warm"):
        f[f"calibration {pair_name}"] = ratio(cal["mse_15_widths"][pair_name]["speedup"])
    f["calibration load"] = load_range(cal["meta"])

    cli = load("benchmarks/results/cli_sweep.json")
    wall = round(cli["result"]["wall_s"])
    f["jquant sweep wall"] = f"{wall // 60} min {wall % 60} s"
    f["jquant sweep load"] = load_range(cli["meta"])
    # each row names the command that wrote its results file
    for path in ("ops", "train_step", "integer", "sweep", "calibration", "cli_sweep"):
        f[f"{path} command"] = f"`{load(f'benchmarks/results/{path}.json')['meta']['command']}`"
    return f


def compared_figures() -> dict[str, str]:
    """The speed figures of the README's comparison with AQT, Qwix and TFLite."""
    f = {}
    _, ops = _ops()
    for op in ("conv", "dense"):
        fwd = ops[op, "fwd"]
        f[f"aqt {op} fwd"] = ratio(fwd["aqt_int8"]["ratio"])
        f[f"qwix {op} fwd"] = ratio(fwd["qwix_int8"]["ratio"])
        f[f"qwix static {op} fwd"] = ratio(fwd["qwix_int8_static"]["ratio"])
        f[f"int {op} fwd"] = ratio(fwd["int"]["ratio"])
        f[f"int_static {op} fwd"] = ratio(fwd["int_static"]["ratio"])
        f[f"qwix {op} fwd+bwd"] = ratio(ops[op, "fwd+bwd"]["qwix_int8"]["ratio"])
        f[f"int {op} fwd+bwd"] = ratio(ops[op, "fwd+bwd"]["int"]["ratio"])
    f["qwix conv1d fwd"] = ratio(ops["conv1d", "fwd"]["qwix_int8"]["ratio"])
    f["int conv1d fwd"] = ratio(ops["conv1d", "fwd"]["int"]["ratio"])
    ts = load("benchmarks/results/train_step.json")
    tv = ts["timing"]["variants"]
    for name in ("int", "qwix_int8_static", "qwix_int8"):
        f[f"train {name}"] = ratio(tv[name]["ratio"])
    agreement = load("benchmarks/results/integer.json")["agreement"]
    for mode in ("double", "single", "fp32"):  # the README says: bit for bit in every mode
        assert agreement[mode]["codes_equal_simulation"], (mode, agreement[mode])
    f["simulation codes"] = f"{agreement['double']['codes_total']:,} output codes"
    return f


def _cell(row: dict[str, Any]) -> str:
    return ratio(row["ratio"]) if row["status"] == "ok" else "unsupported"


def train_step_figures() -> dict[str, str]:
    """The table of the README's quantized training step section (one row per variant, a
    column per model), from ``benchmarks/results/train_step_cpu.json``."""
    d = load("benchmarks/results/train_step_cpu.json")
    rows = {(r["model"], r["variant"]): r for r in d["rows"]}
    models = ("dense", "conv")
    assert {m for m, _ in rows} == set(models)
    variants = list(dict.fromkeys(v for _, v in rows))
    f = {}
    for v in variants:
        if v == "float":
            cells = [f"{rows[m, v]['median_ms']:.1f} ms" for m in models]
        else:
            cells = [_cell(rows[m, v]) for m in models]
        f[v] = f"| `{v}` | {' | '.join(cells)} |"  # the whole row, label included
        f[f"{v} cells"] = f"| {' | '.join(cells)} |"  # what remains once code is blanked
    f["rounds"] = f"{d['config']['rounds']} rounds"
    f["load"] = load_range(d["meta"])
    f["command"] = f"`{d['meta']['command']}`"
    assert not d["meta"]["quick"]
    # the unsupported rows the README explains, with the error the run recorded
    unsupported = {k: r["error"] for k, r in rows.items() if r["status"] == "unsupported"}
    assert set(unsupported) == {("conv", "aqt_int8 fwd+bwd"), ("conv", "aqt_int8 fwd")}
    assert "forward only" in unsupported["conv", "aqt_int8 fwd+bwd"]
    assert "unchanged (zero gradient)" in unsupported["conv", "aqt_int8 fwd"]
    return f


# Numbers of the sections that are setup, not results: the 2-core machine, the 95% CI level,
# the 1-minute load average, 1-D / 2-D convs, batch 256, 1024 examples, 15 widths, the 3 min
# target; peer versions (0.9.0 and 0.1.8 read as 0.9 and 0.1) and the golden vectors'
# 0 mismatches (asserted by the golden-vector tests, not a benchmark).
SPEED_SETUP = ["1", "2", "3", "15", "95", "256", "1024"]
COMPARED_SETUP = ["0", "0.1", "0.9", "1", "95"]
# batch 128, the dense stack 40 -> 256 -> 10, MNIST-1D's 40 x 1 input, 1-D convs of 32
# channels, 95% CI, a ratio of 1, aqtp 0.9.0 (read as 0.9), the 2-D lift
TRAIN_STEP_SETUP = ["0.9", "1", "2", "10", "32", "40", "95", "128", "256"]


def test_speed_section_matches_the_results():
    check_section(README, SPEED, speed_figures(), setup=SPEED_SETUP)


def test_compared_section_matches_the_results():
    check_section(README, COMPARED, compared_figures(), setup=COMPARED_SETUP)


def test_train_step_section_matches_the_results():
    check_section(README, TRAIN_STEP, train_step_figures(), setup=TRAIN_STEP_SETUP)


def test_every_quoted_verdict_follows_the_ci_rule():
    """The committed verdicts are the CI rule's (not a stale median-only ``target_met``)."""
    _, ops = _ops()
    rows = [row for case in ops.values() for row in case.values() if "verdict" in row]
    rows += [
        row
        for path in ("train_step", "integer")
        for row in load(f"benchmarks/results/{path}.json")["timing"]["variants"].values()
        if "verdict" in row
    ]
    assert rows
    for row in rows:
        want = verdict(row["ratio"]["ci95"], row["target"], lower_is_better=row["lower_is_better"])
        assert row["verdict"] == want in VERDICTS


@pytest.mark.parametrize(
    "path", ["ops", "train_step", "train_step_cpu", "integer", "sweep", "calibration", "cli_sweep"]
)
def test_every_results_file_carries_its_meta(path):
    meta = load(f"benchmarks/results/{path}.json")["meta"]
    assert isinstance(meta["quick"], bool) and meta["command"].startswith("python ")
    assert {"load_average_before", "load_average_after", "machine", "date"} <= set(meta)


def _timings(tree: Any):
    """Every ``Timings.to_json`` block inside a results tree."""
    if isinstance(tree, dict):
        if "variants" in tree and "baseline" in tree:
            yield tree
        for v in tree.values():
            yield from _timings(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _timings(v)


@pytest.mark.parametrize("path", ["ops", "train_step", "integer", "sweep", "calibration"])
def test_every_ratio_carries_min_median_and_ci(path):
    blocks = list(_timings(load(f"benchmarks/results/{path}.json")))
    assert blocks
    for block in blocks:
        for name, row in block["variants"].items():
            assert row["min_ms"] <= row["median_ms"], name
            lo, hi = row["ratio"]["ci95"]
            assert lo <= row["ratio"]["median"] <= hi, name
