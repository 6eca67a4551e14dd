"""The one Markdown table formatter: ``report.md``, the tune results and the benchmarks' tables."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as one table cell: pipes escaped, newlines folded (they would end the row)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


NA = "n/a"


def fmt(v: Any, digits: int | None = None) -> str:
    """A value in a table cell: "n/a" when missing or not finite, yes/no for booleans, floats with ``digits``
    decimals (the report's metrics), or short without (4 significant digits below 1, one decimal above)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if digits is not None:
            return f"{v:.{digits}f}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    """The lines of a GitHub Markdown table; ``align`` gives one of ``"l"``/``"r"`` per column (default left)."""
    marks = {"l": "---", "r": "---:"}
    sep = [marks[a] for a in align] if align else ["---"] * len(header)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines
