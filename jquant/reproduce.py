"""Paper reproductions: discover and run the scripts under ``papers/``.

Each paper lives in ``papers/<name>/`` beside the package: a ``README.md`` (the claim, the
published table, ours, where they agree) and a ``reproduce.py`` with
``main(out_dir, quick=False)`` that writes its tables (JSON and CSV) and a PNG plot into
``out_dir`` and returns its tables. ``quick=True`` is the reduced-size run the tests use.

This module also holds what every paper script shares (writing tables and figures, the
``--out`` / ``--quick`` command line), so that the scripts stay thin callers of jquant.

>>> "max1960" in list_papers()
True
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from jquant.sweep.results import Table

__all__ = [
    "papers_dir",
    "list_papers",
    "load_paper",
    "run_paper",
    "write_tables",
    "save_figure",
    "script_main",
]

PAPERS_ENV = "JQUANT_PAPERS"


def papers_dir() -> pathlib.Path:
    """``$JQUANT_PAPERS`` if set, else ``papers/`` at the root of the source checkout."""
    env = os.environ.get(PAPERS_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path(__file__).resolve().parent.parent / "papers"


def list_papers(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the folders under ``root`` (default :func:`papers_dir`) that hold a
    ``reproduce.py``, sorted."""
    root = papers_dir() if root is None else pathlib.Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/reproduce.py"))


def load_paper(name: str, root: str | os.PathLike | None = None) -> ModuleType:
    """Imports ``<root>/<name>/reproduce.py`` (``root`` default :func:`papers_dir`) as a
    module (it is not part of the package)."""
    root = papers_dir() if root is None else pathlib.Path(root)
    known = list_papers(root)
    if name not in known:
        raise ValueError(f"unknown paper {name!r}; known papers: {', '.join(known) or 'none'}")
    path = root / name / "reproduce.py"
    module_name = f"jquant_papers_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before running, as a regular import does (dataclasses look their module up).
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"paper {name!r}: {path} must define main(out_dir, quick=False)")
    return module


def run_paper(
    name: str,
    out_dir: str | os.PathLike,
    quick: bool = False,
    root: str | os.PathLike | None = None,
) -> dict[str, Table]:
    """Runs paper ``name`` and returns its tables (also written, with plots, into ``out_dir``).

    Args:
      name: one of :func:`list_papers`.
      out_dir: output folder, created if missing.
      quick: the reduced-size run (seconds instead of minutes; the tests use it).
      root: the folder of paper folders (default :func:`papers_dir`).
    """
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {quick!r}")
    module = load_paper(name, root)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return module.main(out, quick=quick)


def write_tables(out_dir: str | os.PathLike, tables: Mapping[str, Table]) -> dict[str, Table]:
    """Writes each table as ``<name>.json`` and ``<name>.csv`` into ``out_dir``; prints it."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_json(str(out / f"{name}.json"))
        table.to_csv(str(out / f"{name}.csv"))
        print(f"\n== {name} ==\n{table.format(5)}")
    return dict(tables)


def save_figure(out_dir: str | os.PathLike, name: str, draw: Callable[[Any], None]) -> pathlib.Path:
    """Calls ``draw(fig)`` on a new matplotlib figure (Agg backend), saves ``<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 4))
    try:
        draw(fig)
        fig.tight_layout()
        path = pathlib.Path(out_dir) / f"{name}.png"
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def script_main(main: Callable[..., Any], description: str, argv: list[str] | None = None):
    """The ``__main__`` entry of a paper script: ``--out DIR`` (default ``./results``),
    ``--quick``; runs ``main(out, quick=quick)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="results", help="output folder (default: ./results)")
    parser.add_argument("--quick", action="store_true", help="reduced-size run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return main(out, quick=args.quick)
