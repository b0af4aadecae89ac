"""README.md § "QAT against Qwix and AQT" against ``benchmarks/results/qat_accuracy.json``.

:func:`figures` prints, from the committed results, every row of the section's table (per
configuration and width: QAT test accuracy, mean ± standard error over seeds, in percent) and
the verdict of each low-bit cell, separately for the two kinds of activation ranges: jquant's
dynamic recipe against the best dynamic peer configuration there, jquant's static recipe
against the best static one (a win when the means are apart by more than the sum of their
standard errors). Nothing is rerun here: this reads files only.
"""

from __future__ import annotations

import numpy as np
from figures import check_section, load

RESULTS = "benchmarks/results/qat_accuracy.json"
HEADING = "QAT against Qwix and AQT"
WIDTHS = ("w8a8", "w4a4", "w3a3", "w2a2")
LABELS = {
    "jquant_recipe": "jquant dynamic recipe (jquant.qat.DYNAMIC_RECIPE)",
    "jquant_static_recipe": "jquant static recipe (jquant.qat.STATIC_RECIPE)",
    "jquant_static_lowering": "jquant static recipe, width lowered 8 -> 4 -> 2 over the steps",
    "jquant_static": "jquant LSQ, static activation ranges",
    "jquant_ste": "jquant STE, default rule",
    "qwix_default": "Qwix default (dynamic absmax per example)",
    "qwix_fixed": "Qwix fixed calibrated ranges",
    "qwix_minmax": "Qwix dynamic minmax per example (absmax at 2 and 3 bits)",
    "aqt_default": "AQT default (dynamic)",
}
# (jquant's recipe, its peers): dynamic activation ranges against dynamic ones, static
# against static (AQT has no static activation mode)
CONTESTS = {
    "dynamic": ("jquant_recipe", ("qwix_default", "qwix_minmax", "aqt_default")),
    "static": ("jquant_static_recipe", ("qwix_fixed",)),
}


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` in percent."""
    a = 100 * np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a)))


def cell(values) -> str:
    m, se = mean_se(values)
    return f"{m:.1f} ± {se:.1f}"


def figures(results: dict) -> dict[str, str]:
    """Label -> printed text of every table row and verdict of the section: per step count
    and configuration, one row of PTQ and one of QAT accuracies (``—`` where a width was not
    run); per step count, low width and kind of activation ranges (dynamic, static),
    jquant's recipe of that kind against the best peer of that kind there."""
    cells = results["cells"]
    out = {"float": "| float | | " + " | ".join([cell(results["float"])] * len(WIDTHS)) + " |"}
    for steps in sorted({c["steps"] for c in cells.values()}):
        for name, label in LABELS.items():
            keys = [f"{steps}/{name}/{w}" for w in WIDTHS]
            if not any(k in cells for k in keys):
                continue
            for kind in ("ptq", "qat"):
                if kind == "ptq" and steps != 300:
                    continue  # PTQ does not depend on the step count
                row = " | ".join(cell(cells[k][kind]) if k in cells else "—" for k in keys)
                what = "PTQ" if kind == "ptq" else f"QAT {steps}"
                out[f"{steps} {name} {kind}"] = f"| {label} | {what} | {row} |"
        for kind, (ours_name, peer_names) in CONTESTS.items():
            for w in WIDTHS[1:]:
                if (k := f"{steps}/{ours_name}/{w}") not in cells:
                    continue
                ours = mean_se(cells[k]["qat"])
                peers = {
                    p: mean_se(cells[c]["qat"])
                    for p in peer_names
                    if (c := f"{steps}/{p}/{w}") in cells
                }
                if not peers:
                    continue
                best = max(peers, key=lambda p: peers[p][0])
                gap = ours[0] - peers[best][0]
                verdict = "wins" if gap > ours[1] + peers[best][1] else "does not win"
                out[f"verdict {kind} {steps} {w}"] = (
                    f"{w}, {steps} steps, {kind}: jquant's {kind} recipe {verdict} against the "
                    f"best {kind} peer ({LABELS[best]}) by {gap:+.1f} points"
                )
    for kind, (ours_name, _) in CONTESTS.items():
        if (k := f"300/{ours_name}/w8a8") in cells:
            gap = mean_se(cells[k]["qat"])[0] - mean_se(results["float"])[0]
            out[f"w8a8 vs float {kind}"] = (
                f"w8a8: jquant's {kind} recipe is {gap:+.1f} points from float"
            )
    return out


def test_readme_section_matches_results():
    results = load(RESULTS)
    setup = ["8", "4", "2", "1", "300", "1000", "128", "1e-3", "3", "3000", "1500", "13"]
    check_section("README.md", HEADING, figures(results), setup)
