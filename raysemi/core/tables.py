"""The one Markdown table formatter: ``report.md``, the tune results and the benchmarks' tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as one table cell: pipes escaped, newlines folded (they would end the row)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def fmt_short(v: Any) -> str:
    """A value in a short cell: n/a, yes/no, 4 significant digits below 1, one decimal above."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    """The lines of a GitHub Markdown table; ``align`` gives one of ``"l"``/``"r"`` per column (default left)."""
    marks = {"l": "---", "r": "---:"}
    sep = [marks[a] for a in align] if align else ["---"] * len(header)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines
