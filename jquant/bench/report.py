"""Output of the ``jquant bench`` grids: a text table, CSV, JSON and plots.

- :func:`format_table`: per cell and variant, median ms, rate, percent of peak and speedup
  over the baseline (or ``unsupported``);
- :func:`write_csv`: one line per row; nested values (intervals) as JSON text;
- :func:`speedup_plot`: speedup ``t_baseline / t`` of each variant against the cells, in order
  of operation count; :func:`roofline_plot`: arithmetic intensity (flops per byte of operands
  and output) against the achieved rate, log-log, with each format's peak as a horizontal line
  and, where the memory bandwidth is known, the bandwidth roof ``rate = bandwidth *
  intensity``.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jquant.bench.peaks import Peak

__all__ = ["format_table", "roofline_plot", "speedup_plot", "write_csv"]

_COLUMNS = (
    "case",
    "group",
    "variant",
    "format",
    "status",
    "flops",
    "bytes",
    "intensity",
    "median_ms",
    "ci95_ms",
    "rate_tflops",
    "unit",
    "peak_tflops",
    "percent_of_peak",
    "time_ratio",
    "speedup",
    "ratio_to_raw_int8",
    "max_rel_err",
    "error",
)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """The rows as a text table (``unsupported`` rows show their error)."""
    lines = [title] if title else []
    lines.append(
        f"{'case':<34}{'variant':<17}{'median ms':>10}{'rate':>10} {'unit':<8}{'% peak':>7}"
        f"{'speedup':>9}"
    )
    for r in rows:
        head = f"{r['case']:<34}{r['variant']:<17}"
        if r["status"] != "ok":
            lines.append(f"{head}unsupported: {r['error'][:80]}")
            continue
        lines.append(
            f"{head}{r['median_ms']:>10.3f}{r['rate_tflops']:>10.4f} {r['unit']:<8}"
            f"{_fmt(r['percent_of_peak'], '.1f'):>7}{r['speedup']:>9.2f}"
        )
    return "\n".join(lines)


def write_csv(
    rows: Sequence[Mapping[str, Any]],
    path: str | pathlib.Path,
    columns: Sequence[str] = _COLUMNS,
) -> pathlib.Path:
    """Writes the rows as CSV with ``columns`` (default: the grid's); lists and dicts as JSON
    text, a missing value as an empty field."""
    path = pathlib.Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            values = [r.get(c) for c in columns]
            w.writerow(
                [
                    json.dumps(v) if isinstance(v, list | dict) else ("" if v is None else v)
                    for v in values
                ]
            )
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_plot(rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """Speedup over the baseline of every variant, cells in order of operation count."""
    plt = _pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    cases = sorted({r["case"]: r["flops"] for r in ok}.items(), key=lambda kv: kv[1])
    order = {c: i for i, (c, _) in enumerate(cases)}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cases) + 3), 4.5))
    for variant in dict.fromkeys(r["variant"] for r in ok):
        pts = sorted((order[r["case"]], r["speedup"]) for r in ok if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=variant)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), [c for c, _ in cases], rotation=60, ha="right", fontsize=7)
    against = ok[0]["time_ratio"]["against"] if ok else ""
    ax.set_ylabel(f"speedup over {against} (t_{against} / t)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roofline_plot(
    rows: Sequence[Mapping[str, Any]], peak: Peak, path: str | pathlib.Path, title: str
) -> None:
    """Achieved rate against arithmetic intensity, with the peak (and bandwidth) roofs."""
    plt = _pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {}
    for variant in dict.fromkeys(r["variant"] for r in ok):
        pts = [(r["intensity"], r["rate_tflops"]) for r in ok if r["variant"] == variant]
        (line,) = ax.plot(*zip(*pts, strict=True), "o", label=variant, alpha=0.8)
        colors[variant] = line.get_color()
    for fmt, rate in peak.rates.items():
        ax.axhline(rate, ls="--", lw=1, color=colors.get(fmt, "gray"))
        label = f"{fmt} peak ({peak.kind}) {rate:.3g}"
        where = ("axes fraction", "data")
        ax.annotate(label, (0.01, rate), xycoords=where, fontsize=7, va="bottom")
    if peak.bandwidth_gbs and ok:
        xs = sorted(r["intensity"] for r in ok)
        xs = [xs[0] / 2, xs[-1] * 2]
        ax.plot(xs, [peak.bandwidth_gbs * x / 1e3 for x in xs], "k:", lw=1, label="bandwidth roof")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (operations per byte of operands and output)")
    ax.set_ylabel("achieved TFLOP/s (TOP/s for integer formats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
