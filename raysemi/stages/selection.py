"""Choosing the pseudo-label budget N from the predictions: top-N by confidence, or shared among classes.

Everything here is deterministic: candidates are ordered by confidence (highest first) with ties broken
by id (ascending), so the same predictions always give the same selection, whatever their row order.
The order's key is ``(-confidence, id)``; a selection is a ``SelectionRule`` of thresholds on it, found
from per-shard summaries (``data.order_stats``), so that the rows themselves never leave their shards.

Shared selection (``prior`` given: a weight per class) gives class ``c`` a quota of
``floor(budget * prior[c] / sum(prior))`` slots, filled with its most confident candidates (or all it has,
if fewer). The slots left over (the rounding remainder, plus the shortfall of classes with too few
candidates) then go to the most confident candidates not yet chosen, whatever their class. So a rare class
never blocks the budget, and the filling-in favours confidence, as plain top-N does. A uniform prior is
the class-balanced choice; the labelled rows' class counts keep the pseudo-labels in the proportions of
the labelled set (on an imbalanced set, a model's confident predictions over-represent the majority
class, which plain top-N would then amplify round after round).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysemi.core.errors import RaysemiError
from raysemi.data.order_stats import Key, RangeSummary, at_or_below, kth_smallest, summarize

log = logging.getLogger("raysemi.pseudolabel")

SELECTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("pred", pa.int16(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
    ]
)


def check_budget(budget: int, pool_size: int) -> None:
    """Refuse a budget larger than the unlabeled pool (a clear error before any work starts)."""
    if budget > pool_size:
        raise RaysemiError(f"pseudolabel.budget={budget} is larger than the unlabeled pool ({pool_size} images)")


def budget_count(budget: float, pool_size: int) -> int:
    """Images per round: ``budget`` <= 1 is a fraction of the pool (at least 1 image), else a count."""
    if budget <= 1.0:
        return max(1, round(budget * pool_size)) if pool_size else 0
    return int(budget)


def selection_prior(selection: str, labeled_counts: list[int]) -> list[float] | None:
    """The class shares of ``pseudolabel.selection``: None (top-N), uniform, or the labelled rows' class
    counts (``labeled_counts``, one per class)."""
    if selection == "top":
        return None
    if selection == "balanced":
        return [1.0] * len(labeled_counts)
    if selection == "prior":
        return [float(n) for n in labeled_counts]
    raise RaysemiError(f"pseudolabel.selection: unknown rule {selection!r} (top, balanced or prior)")


SEL = ("negc", "id")  # the selection order's key columns: -confidence, then id
Limit = Key | str | None  # a key, "all" or None (nothing)


def _mask(array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=bool)


def candidates(predictions: pa.Table, num_classes: int, pool: np.ndarray | None = None,
               min_confidence: float = 0.0) -> pa.Table:
    """The rows that may be chosen: ``id, pred, confidence, negc, row`` (``row``: the index in
    ``predictions``) of the pool's predictions at or above ``min_confidence``, in the given order."""
    missing = {"id", "pred", "confidence"} - set(predictions.column_names)
    if missing:
        raise RaysemiError(f"predictions lack the column(s) {', '.join(sorted(missing))}")
    table = predictions.select(["id", "pred", "confidence"]).cast(SELECTION_SCHEMA)
    if table.num_rows != pc.count_distinct(table.column("id")).as_py():
        raise RaysemiError("predictions hold some id more than once: re-run pseudolabel (exactly-once violated)")
    preds = table.column("pred").to_numpy()
    if len(preds) and (preds.min() < 0 or preds.max() >= num_classes):
        raise RaysemiError(f"predictions hold class indices outside [0, {num_classes})")
    table = table.append_column("negc", pc.negate(table.column("confidence")))
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    keep = np.ones(table.num_rows, dtype=bool) if pool is None else np.asarray(pool, dtype=bool)
    if min_confidence > 0.0:
        keep &= _mask(pc.greater_equal(table.column("confidence"), pa.scalar(min_confidence, pa.float32())))
    return table if keep.all() else table.filter(pa.array(keep))


@dataclass(frozen=True)
class SelectionRule:
    """The chosen candidates: per class those at or below ``class_limits[c]`` (shared selection), then any
    other candidate at or below ``rest_limit`` (the whole choice for plain top-N)."""

    class_limits: tuple[Limit, ...] | None
    rest_limit: Limit

    def chosen(self, cands: pa.Table) -> np.ndarray:
        mask = np.zeros(cands.num_rows, dtype=bool)
        if self.class_limits is not None:
            pred = cands.column("pred").to_numpy()
            for c, limit in enumerate(self.class_limits):
                of_c = pred == c
                if of_c.any() and limit is not None:
                    mask[of_c] = at_or_below(cands.filter(pa.array(of_c)), SEL, limit)
        rest = np.flatnonzero(~mask)
        if len(rest) and self.rest_limit is not None:
            mask[rest] = at_or_below(cands.take(pa.array(rest)), SEL, self.rest_limit)
        return mask


def range_summaries(cands: pa.Table, ranges: dict[Any, tuple], class_limits: tuple | None) -> dict[Any, RangeSummary]:
    """One shard group's summaries for the selection's queries: ``"top"`` (every candidate), a class index
    (its candidates) or ``"rest"`` (those the ``class_limits`` leave)."""
    out = {}
    for q, (lo, hi) in ranges.items():
        if q == "rest":
            rows = cands.filter(pa.array(~SelectionRule(class_limits, None).chosen(cands)))
        elif q == "top":
            rows = cands
        else:
            rows = cands.filter(pc.equal(cands.column("pred"), pa.scalar(q, pa.int16())))
        out[q] = summarize(rows, SEL, lo, hi)
    return out


SummaryPass = Callable[[dict[Any, tuple], tuple | None], list[dict[Any, RangeSummary]]]


def plan_selection(class_counts: list[int], budget: int, prior: list[float] | None,
                   run_pass: SummaryPass) -> SelectionRule:
    """The rule choosing ``budget`` of the candidates (``class_counts`` per predicted class), see the module
    docstring; ``run_pass(ranges, class_limits)`` maps ``range_summaries`` over the shard groups."""
    if budget < 0:
        raise RaysemiError(f"pseudolabel.budget={budget} must not be negative")
    if prior is not None and (len(prior) != len(class_counts) or min(prior) < 0 or sum(prior) <= 0):
        raise RaysemiError(f"the class prior {prior} does not fit {len(class_counts)} classes")
    n = sum(class_counts)
    if budget >= n:
        return SelectionRule(None, "all" if n else None)
    if budget == 0:
        return SelectionRule(None, None)
    if prior is None:
        return SelectionRule(None, kth_smallest({"top": budget}, lambda r: run_pass(r, None))["top"])
    share = np.asarray(prior, dtype=np.float64) / float(sum(prior))
    # A tiny epsilon: 6 * (1/3) must give quota 2, not 1.999... -> 1.
    quotas = np.floor(budget * share + 1e-9).astype(np.int64).tolist()
    limits: list[Limit] = [None if q == 0 else "all" if q >= m else None for q, m in zip(quotas, class_counts)]
    partial = {c: q for c, (q, m) in enumerate(zip(quotas, class_counts)) if 0 < q < m}
    for c, key in kth_smallest(partial, lambda r: run_pass(r, None)).items():
        limits[c] = key
    left = budget - sum(min(q, m) for q, m in zip(quotas, class_counts))  # remainder + small classes' shortfall
    rest: Limit = None
    if left:
        rest = kth_smallest({"rest": left}, lambda r: run_pass(r, tuple(limits)))["rest"]
    return SelectionRule(tuple(limits), rest)


def class_counts_of(cands: pa.Table, num_classes: int) -> list[int]:
    """Candidates per predicted class."""
    return np.bincount(cands.column("pred").to_numpy().astype(np.int64), minlength=num_classes).tolist()
