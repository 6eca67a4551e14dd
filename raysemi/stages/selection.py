"""Choosing the pseudo-label budget N from the predictions: top-N by confidence, or shared among classes.

Everything here is deterministic: candidates are ordered by confidence (highest first) with ties broken
by id (ascending), so the same predictions always give the same selection, whatever their row order.

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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysemi.errors import RaysemiError

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


def selection_prior(selection: str, labeled_targets, num_classes: int) -> list[float] | None:
    """The class shares of ``pseudolabel.selection``: None (top-N), uniform, or the labelled counts."""
    if selection == "top":
        return None
    if selection == "balanced":
        return [1.0] * num_classes
    if selection == "prior":
        counts = np.bincount(np.asarray(labeled_targets, dtype=np.int64), minlength=num_classes)
        return counts.astype(float).tolist()
    raise RaysemiError(f"pseudolabel.selection: unknown rule {selection!r} (top, balanced or prior)")


def _ordered(table: pa.Table) -> pa.Table:
    """Most confident first, ties broken by id: a total order, so the selection is reproducible."""
    idx = pc.sort_indices(table, sort_keys=[("confidence", "descending"), ("id", "ascending")])
    return table.take(idx)


def candidates(
    predictions: pa.Table, pool_ids: set[str] | None, min_confidence: float = 0.0
) -> pa.Table:
    """The pool's predictions (``id, pred, confidence``) at or above ``min_confidence``, ordered."""
    missing = {"id", "pred", "confidence"} - set(predictions.column_names)
    if missing:
        raise RaysemiError(f"predictions lack the column(s) {', '.join(sorted(missing))}")
    table = predictions.select(["id", "pred", "confidence"]).cast(SELECTION_SCHEMA)
    if table.num_rows != pc.count_distinct(table.column("id")).as_py():
        raise RaysemiError("predictions hold some id more than once: re-run pseudolabel (exactly-once violated)")
    if pool_ids is not None:
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(pool_ids), pa.string())))
    if min_confidence > 0.0:
        table = table.filter(pc.greater_equal(table.column("confidence"), pa.scalar(min_confidence, pa.float32())))
    return _ordered(table)


def select_pseudo_labels(
    predictions: pa.Table,
    pool_ids: set[str] | None,
    budget: int,
    num_classes: int,
    *,
    prior: list[float] | None = None,
    min_confidence: float = 0.0,
) -> pa.Table:
    """The ``budget`` pseudo-labels to add: a table ``id, pred, confidence``, most confident first.

    ``pool_ids`` restricts the choice to those ids (the unlabeled pool; None = every prediction).
    ``prior`` (a non-negative weight per class) shares the budget among the classes; None = plain top-N.
    Fewer than ``budget`` rows come back when ``min_confidence`` leaves fewer candidates (a warning
    says so); see the module docstring for the shared rule.
    """
    if budget < 0:
        raise RaysemiError(f"pseudolabel.budget={budget} must not be negative")
    if num_classes < 1:
        raise RaysemiError(f"num_classes={num_classes} must be >= 1")
    table = candidates(predictions, pool_ids, min_confidence)
    preds = table.column("pred").to_numpy()
    if len(preds) and (preds.min() < 0 or preds.max() >= num_classes):
        raise RaysemiError(f"predictions hold class indices outside [0, {num_classes})")

    if prior is None:
        chosen = table.slice(0, budget)
    else:
        if len(prior) != num_classes or min(prior) < 0 or sum(prior) <= 0:
            raise RaysemiError(f"the class prior {prior} does not fit {num_classes} classes")
        chosen = table.take(pa.array(_shared_indices(preds, budget, prior), pa.int64()))
        chosen = _ordered(chosen)

    if chosen.num_rows < budget:
        log.warning(
            "only %d of the budget of %d pseudo-labels pass min_confidence=%.3f (pool: %s candidates)",
            chosen.num_rows, budget, min_confidence, table.num_rows,
        )
    return chosen


def _shared_indices(preds: np.ndarray, budget: int, prior: list[float]) -> np.ndarray:
    """Row indices (into rows already in confidence order) of a choice of ``budget`` shared by ``prior``."""
    n = len(preds)
    if budget >= n:
        return np.arange(n)
    share = np.asarray(prior, dtype=np.float64) / float(sum(prior))
    # A tiny epsilon: 6 * (1/3) must give quota 2, not 1.999... -> 1.
    quotas = np.floor(budget * share + 1e-9).astype(np.int64)
    take = np.zeros(n, dtype=bool)
    for c, quota in enumerate(quotas):
        if quota:
            rows = np.flatnonzero(preds == c)  # already most confident first
            take[rows[:quota]] = True
    left = budget - int(take.sum())  # the remainder plus the shortfall of small classes
    if left:
        rest = np.flatnonzero(~take)  # still in confidence order
        take[rest[:left]] = True
    return np.flatnonzero(take)


def class_counts(selection: pa.Table, num_classes: int) -> list[int]:
    """How many pseudo-labels each class got (for the log and the run report)."""
    return np.bincount(selection.column("pred").to_numpy().astype(np.int64), minlength=num_classes).tolist()
