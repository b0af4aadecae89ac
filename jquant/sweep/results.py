"""A results table: an immutable list of rows with named columns.

Every sweep returns a :class:`Table`. It converts to a list of dicts, CSV, JSON and (when
pandas is installed) a ``pandas.DataFrame``, and prints as an aligned text table. Values are
plain Python scalars (``int``, ``float``, ``str``, ``bool``, ``None``), so JSON and CSV round
trip without NumPy types. JSON has no non-finite numbers: NaN and +-inf are written as
``null`` in JSON (rows and meta; read back as None) and as ``nan`` / ``inf`` in CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Table"]

Scalar = int | float | str | bool | None


def _scalar(value: Any, column: str) -> Scalar:
    """A plain Python scalar from NumPy / JAX scalars; TypeError for anything else."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.generic | np.ndarray) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.shape != ():
            raise TypeError(f"column {column!r}: values must be scalars, got shape {arr.shape}")
        value = arr.item()
    if isinstance(value, bool | numbers.Integral):
        return value if isinstance(value, bool) else int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"column {column!r}: values must be scalars, got {type(value).__name__}")


def _json_safe(value: Any) -> Any:
    """``value`` with NumPy / JAX scalars made plain and non-finite floats made None, through
    dicts, lists and tuples (JSON has no NaN or Infinity)."""
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    value = _scalar(value, "meta")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows of results with fixed columns, in order.

    Args:
      columns: column names, in display order.
      rows: one tuple of values per row, aligned with ``columns``.

      meta: free-form run information (peak memory, devices, ...), kept out of the rows.

    Build one with :meth:`from_dicts`; combine with :meth:`concat`; select with :meth:`where`.

    >>> t = Table.from_dicts([{"bits": 4, "sqnr_db": 25.1}, {"bits": 8, "sqnr_db": 49.2}])
    >>> t.column("bits")
    [4, 8]
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Scalar, ...], ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        cols = tuple(self.columns)
        if len(set(cols)) != len(cols) or not all(isinstance(c, str) for c in cols):
            raise ValueError(f"columns must be distinct strings, got {cols!r}")
        rows = []
        for i, row in enumerate(self.rows):
            row = tuple(row)
            if len(row) != len(cols):
                raise ValueError(f"row {i} has {len(row)} values for {len(cols)} columns {cols}")
            rows.append(tuple(_scalar(v, c) for v, c in zip(row, cols, strict=True)))
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "rows", tuple(rows))
        object.__setattr__(self, "meta", dict(self.meta))

    @classmethod
    def from_dicts(
        cls, records: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
    ) -> Table:
        """A table from dicts; columns in first-seen order (or ``columns``); missing -> None."""
        records = list(records)
        if columns is None:
            seen: dict[str, None] = {}
            for r in records:
                seen.update(dict.fromkeys(r))
            columns = tuple(seen)
        return cls(tuple(columns), tuple(tuple(r.get(c) for c in columns) for r in records))

    @classmethod
    def concat(cls, tables: Iterable[Table]) -> Table:
        """Rows of all ``tables`` in order; the columns are the union in first-seen order."""
        return cls.from_dicts(r for t in tables for r in t.to_dicts())

    def with_meta(self, **meta: Any) -> Table:
        """The same rows with ``meta`` entries added (e.g. ``peak_bytes``); written by to_json."""
        return dataclasses.replace(self, meta={**self.meta, **meta})

    def __len__(self) -> int:
        return len(self.rows)

    def to_dicts(self) -> list[dict[str, Scalar]]:
        """One dict per row, keys in column order."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def column(self, name: str) -> list[Scalar]:
        """The values of one column."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns are {self.columns}")
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def where(self, **equals: Scalar) -> Table:
        """The rows whose columns equal the given values: ``t.where(granularity="per_tensor")``."""
        for name in equals:
            if name not in self.columns:
                raise KeyError(f"no column {name!r}; columns are {self.columns}")
        idx = [self.columns.index(n) for n in equals]
        values = tuple(equals.values())
        keep = tuple(r for r in self.rows if tuple(r[i] for i in idx) == values)
        return Table(self.columns, keep, self.meta)

    def to_csv(self, path: str | None = None) -> str:
        """CSV text with a header row (written to ``path`` too when given)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(("" if v is None else v for v in row) for row in self.rows)
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def to_json(self, path: str | None = None) -> str:
        """JSON ``{"columns": [...], "rows": [{...}, ...], "meta": {...}}`` (also to ``path``).

        Strict JSON: non-finite floats (NaN, +-inf) in rows and meta are written as ``null``
        (``json.loads`` with a ``parse_constant`` that raises accepts the text), so
        :meth:`from_json` reads them back as None; the CSV keeps ``nan`` / ``inf``.
        """
        doc = {"columns": list(self.columns), "rows": self.to_dicts(), "meta": self.meta}
        text = json.dumps(_json_safe(doc), indent=1, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> Table:
        """Inverse of :meth:`to_json` (extra keys are ignored)."""
        data = json.loads(text)
        return cls.from_dicts(data["rows"], data["columns"]).with_meta(**data.get("meta", {}))

    def to_pandas(self):
        """A ``pandas.DataFrame`` with the same columns (ImportError if pandas is missing)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Table.to_pandas needs pandas: pip install pandas") from e
        return pd.DataFrame.from_records(list(self.rows), columns=list(self.columns))

    def format(self, digits: int = 4) -> str:
        """Aligned text: floats with ``digits`` significant digits, None as empty."""

        def cell(v: Scalar) -> str:
            if v is None:
                return ""
            if isinstance(v, float) and not isinstance(v, bool):
                return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
            return str(v)

        cells = [list(self.columns)] + [[cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
