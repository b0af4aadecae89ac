"""Figures of sweep tables, drawn with matplotlib's Agg canvas (no pyplot, no global state).

Each function takes a :class:`~jquant.sweep.results.Table`, writes one PNG to ``path`` and
returns ``path``:

- :func:`sqnr_vs_bits`: SQNR (dB) against width, one line per group, with the
  ``6.02 dB/bit`` reference ``SQNR = 20 log10(2^b)`` of a full-scale uniform signal;
- :func:`metric_vs_bits`: any column against width (accuracy, loss, ...);
- :func:`sensitivity_bars`: per-layer accuracy drop and SQNR;
- :func:`pareto_front`: accuracy against model size, with the non-dominated points joined,
  the chosen configuration starred and the size budget drawn when the table has them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jquant.sweep.results import Table

__all__ = ["metric_vs_bits", "pareto_front", "pareto_mask", "sensitivity_bars", "sqnr_vs_bits"]

DB_PER_BIT = 20.0 * math.log10(2.0)


def _figure(width: float = 6.4, height: float = 4.2):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _check_columns(table: Table, *names: str) -> None:
    if not isinstance(table, Table):
        raise TypeError(f"table must be a jquant.sweep.Table, got {type(table).__name__}")
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it has {list(table.columns)}")


def _groups(table: Table, group_by: Sequence[str]) -> dict[str, list[dict]]:
    """Rows grouped by the values of ``group_by`` (only the columns whose values vary)."""
    group_by = [g for g in group_by if g in table.columns and len(set(table.column(g))) > 1]
    out: dict[str, list[dict]] = {}
    for row in table.to_dicts():
        label = ", ".join(str(row[g]) for g in group_by) or "all"
        out.setdefault(label, []).append(row)
    return out


def metric_vs_bits(
    table: Table,
    path: str,
    y: str,
    *,
    x: str = "bits",
    group_by: Sequence[str] = ("tensor", "kind", "family", "granularity", "calibration"),
    title: str | None = None,
    reference_db_per_bit: bool = False,
) -> str:
    """Lines of column ``y`` against column ``x``, one per distinct ``group_by`` value."""
    _check_columns(table, x, y)
    fig = _figure()
    ax = fig.add_subplot()
    for label, rows in _groups(table, group_by).items():
        rows = sorted(rows, key=lambda r: r[x])
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", ms=3, label=label)
    if reference_db_per_bit:
        bits = np.unique(np.asarray(table.column(x), float))
        ax.plot(bits, DB_PER_BIT * bits, "k--", lw=1, label=f"{DB_PER_BIT:.2f} dB/bit")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{y} vs {x}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def sqnr_vs_bits(table: Table, path: str, **kwargs) -> str:
    """SQNR (dB) against width with the ``6.02 dB/bit`` reference line."""
    return metric_vs_bits(table, path, "sqnr_db", reference_db_per_bit=True, **kwargs)


def sensitivity_bars(
    table: Table,
    path: str,
    *,
    layer: str = "layer",
    drop: str = "accuracy_drop",
    title: str = "per-layer sensitivity",
) -> str:
    """Per-layer bars of ``drop`` (left) and, when present, ``sqnr_db`` (right)."""
    _check_columns(table, layer, drop)
    rows = table.to_dicts()
    names = [str(r[layer]) for r in rows]
    has_sqnr = "sqnr_db" in table.columns
    fig = _figure(width=6.4 * (2 if has_sqnr else 1))
    axes = fig.subplots(1, 2 if has_sqnr else 1, squeeze=False)[0]
    pos = np.arange(len(rows))
    axes[0].barh(pos, [r[drop] for r in rows])
    axes[0].set_xlabel(drop)
    if has_sqnr:
        axes[1].barh(pos, [r["sqnr_db"] for r in rows], color="tab:orange")
        axes[1].set_xlabel("sqnr_db")
    for ax in axes:
        ax.set_yticks(pos, names, fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_title(title)
    return _save(fig, path)


def pareto_mask(size: Sequence[float], score: Sequence[float]) -> np.ndarray:
    """True where no other point has ``size <= `` and ``score >=`` with one strict.

    A point is on the Pareto front (smaller is better for size, larger for score) when it is
    not dominated.
    """
    size, score = np.asarray(size, float), np.asarray(score, float)
    if size.shape != score.shape or size.ndim != 1:
        raise ValueError(
            f"size and score must be 1-D of one length, got shapes {size.shape}, {score.shape}"
        )
    le = size[None, :] <= size[:, None]
    ge = score[None, :] >= score[:, None]
    strict = (size[None, :] < size[:, None]) | (score[None, :] > score[:, None])
    return ~np.any(le & ge & strict, axis=1)


def pareto_front(
    table: Table,
    path: str,
    *,
    size: str = "size_bytes",
    score: str = "accuracy",
    chosen: str = "chosen",
) -> str:
    """Scatter of ``score`` against ``size``; the Pareto-optimal points are joined by a line.

    When the table has a boolean column ``chosen`` (as :func:`jquant.sweep.mixed_precision`'s
    does), its true row is starred; a finite ``meta["budget_bytes"]`` is a vertical line.
    """
    _check_columns(table, size, score)
    s = np.asarray(table.column(size), float)
    a = np.asarray(table.column(score), float)
    front = pareto_mask(s, a)
    order = np.argsort(s[front])
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(s, a, s=12, alpha=0.5, label="candidates")
    ax.plot(s[front][order], a[front][order], "r-o", ms=4, label="Pareto front")
    budget = table.meta.get("budget_bytes")
    if isinstance(budget, (int, float)) and math.isfinite(budget):
        ax.axvline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g} B")
    if chosen in table.columns:
        pick = np.asarray(table.column(chosen), bool)
        ax.scatter(
            s[pick], a[pick], marker="*", s=160, c="gold", edgecolors="k", zorder=3, label="chosen"
        )
    ax.set_xlabel(size)
    ax.set_ylabel(score)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{score} vs {size}")
    return _save(fig, path)
