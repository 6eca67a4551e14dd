"""Choosing the pseudo-label budget N from the predictions: top-N by confidence, optionally class-balanced.

Everything here is deterministic: candidates are ordered by confidence (highest first) with ties broken
by id (ascending), so the same predictions always give the same selection, whatever their row order.

Class-balanced selection (``class_balanced=True``) splits the budget evenly over the classes: each class
first takes its ``budget // num_classes`` most confident candidates (or all it has, if fewer). The slots
left over (the ``budget % num_classes`` remainder, plus the shortfall of classes with too few candidates)
then go to the most confident candidates not yet chosen, whatever their class. So a rare class never
blocks the budget, and the filling-in favours confidence, as plain top-N does.
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
    class_balanced: bool = False,
    min_confidence: float = 0.0,
) -> pa.Table:
    """The ``budget`` pseudo-labels to add: a table ``id, pred, confidence``, most confident first.

    ``pool_ids`` restricts the choice to those ids (the unlabeled pool; None = every prediction).
    Fewer than ``budget`` rows come back when ``min_confidence`` leaves fewer candidates (a warning
    says so); see the module docstring for the class-balanced rule.
    """
    if budget < 0:
        raise RaysemiError(f"pseudolabel.budget={budget} must not be negative")
    if num_classes < 1:
        raise RaysemiError(f"num_classes={num_classes} must be >= 1")
    table = candidates(predictions, pool_ids, min_confidence)
    preds = table.column("pred").to_numpy()
    if len(preds) and (preds.min() < 0 or preds.max() >= num_classes):
        raise RaysemiError(f"predictions hold class indices outside [0, {num_classes})")

    if not class_balanced:
        chosen = table.slice(0, budget)
    else:
        chosen = table.take(pa.array(_balanced_indices(preds, budget, num_classes), pa.int64()))
        chosen = _ordered(chosen)

    if chosen.num_rows < budget:
        log.warning(
            "only %d of the budget of %d pseudo-labels pass min_confidence=%.3f (pool: %s candidates)",
            chosen.num_rows, budget, min_confidence, table.num_rows,
        )
    return chosen


def _balanced_indices(preds: np.ndarray, budget: int, num_classes: int) -> np.ndarray:
    """Row indices (into rows already in confidence order) of a class-balanced choice of ``budget``."""
    n = len(preds)
    if budget >= n:
        return np.arange(n)
    quota = budget // num_classes
    take = np.zeros(n, dtype=bool)
    if quota:
        for c in range(num_classes):
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
