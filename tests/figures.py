"""Figures quoted in the docs, checked against the committed results that back them.

A test names one section of a document (a markdown heading), the figures it quotes, each
computed from a committed results file and formatted to the printed precision, and the numbers
in that section that are setup rather than results (bit widths, step counts, seeds). Then
:func:`check_section` fails when

- a figure computed from the results is not printed in the section (the doc or the results
  drifted), or
- the section prints a number that is neither a checked figure nor declared setup (a figure
  with no results file behind it).

Numbers inside code (fenced blocks and inline ``code`` spans: commands, paths, options) and
inside identifiers (``int8``, ``w4a4``, ``fp8_e4m3``, ``8x8``) are not figures; ``2e-4`` and
``1.01x`` are one number each.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent

# a number standing on its own: not inside a word (int8, w4a4, e4m3, 8x8) or a longer number;
# scientific notation (2e-4) is one number, and so is a ratio with an x suffix (1.01x)
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:x(?!\w))?(?!\w)")
_FENCED = re.compile(r"```.*?```", flags=re.S)
_INLINE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$", flags=re.M)


def load(relpath: str) -> Any:
    """The JSON results file at ``relpath`` (relative to the repository root)."""
    return json.loads((ROOT / relpath).read_text())


def _headings(doc: str) -> tuple[str, list[re.Match]]:
    text = (ROOT / doc).read_text()
    fenced = [m.span() for m in _FENCED.finditer(text)]
    heads = [m for m in _HEADING.finditer(text) if not any(a <= m.start() < b for a, b in fenced)]
    return text, heads


def headings(doc: str) -> list[str]:
    """The titles of ``doc``'s headings (outside code blocks), in order."""
    return [m.group(2) for m in _headings(doc)[1]]


def section(doc: str, heading: str, *, own: bool = False) -> str:
    """The text of ``doc`` (a path relative to the repository root) under the heading whose
    title is ``heading``, up to the next heading of the same or a higher level (``own``: up
    to the next heading of any level, i.e. without its subsections)."""
    text, heads = _headings(doc)
    for i, m in enumerate(heads):
        if m.group(2) == heading:
            level = len(m.group(1)) if not own else 99
            end = next((h.start() for h in heads[i + 1 :] if len(h.group(1)) <= level), len(text))
            return text[m.end() : end]
    raise AssertionError(f"{doc}: no heading {heading!r}; headings: {headings(doc)}")


def numbers(text: str) -> list[str]:
    """Number tokens of ``text`` outside code spans and identifiers."""
    text = _INLINE.sub(" ", _FENCED.sub(" ", text))
    return NUMBER.findall(text)


def check_section(
    doc: str,
    heading: str,
    figures: Mapping[str, str],
    setup: Iterable[str] = (),
    *,
    own: bool = False,
) -> None:
    """Assert that section ``heading`` of ``doc`` prints every figure and nothing unchecked
    (``own``: its own text only, without its subsections, which are checked on their own).

    Args:
      doc: the document, relative to the repository root.
      heading: the section's heading title.
      figures: label -> the printed text computed from a results file (e.g. ``"1.01x"``,
        ``"93.4%"``, ``"| 93.4 | 93.5 |"``); each must occur in the section verbatim.
      setup: the numbers of the section that are not results (as printed, e.g. ``"1500"``).
    """
    text = section(doc, heading, own=own)
    missing = {label: want for label, want in figures.items() if want not in text}
    assert not missing, f"{doc} § {heading}: figures differ from the results: {missing}"
    rest = _INLINE.sub(" ", _FENCED.sub(" ", text))
    for want in sorted(set(figures.values()), key=len, reverse=True):
        rest = rest.replace(want, " ")
    allowed = set(setup)
    unchecked = [n for n in NUMBER.findall(rest) if n not in allowed]
    assert not unchecked, (
        f"{doc} § {heading}: numbers with no results file behind them (add a figure or "
        f"declare them as setup): {sorted(set(unchecked))}"
    )
