"""Top-N and class-balanced pseudo-label selection on hand-made predictions."""

from __future__ import annotations

import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raysemi.core.errors import RaysemiError
from raysemi.stages.selection import (
    SEL,
    SELECTION_SCHEMA,
    budget_count,
    candidates,
    check_budget,
    class_counts_of,
    plan_selection,
    range_summaries,
    selection_prior,
)

log = logging.getLogger("raysemi.pseudolabel")


def select_pseudo_labels(
    predictions: pa.Table,
    pool_ids: set[str] | None,
    budget: int,
    num_classes: int,
    *,
    prior: list[float] | None = None,
    min_confidence: float = 0.0,
) -> pa.Table:
    """The selection rule on one table of predictions in memory (one shard), as ``stages.pool`` applies it
    shard by shard: ``id, pred, confidence`` of the ``budget`` pseudo-labels, most confident first. ``pool_ids`` restricts the choice (None = all rows).
    Fewer rows come back when ``min_confidence`` leaves fewer candidates (a warning says so)."""
    if budget < 0:
        raise RaysemiError(f"pseudolabel.budget={budget} must not be negative")
    if num_classes < 1:
        raise RaysemiError(f"num_classes={num_classes} must be >= 1")
    pool = None
    if pool_ids is not None:
        pool = np.asarray(pc.is_in(predictions.column("id"), value_set=pa.array(sorted(pool_ids), pa.string())))
    cands = candidates(predictions, num_classes, pool, min_confidence)
    rule = plan_selection(class_counts_of(cands, num_classes), budget, prior,
                          lambda ranges, limits: [range_summaries(cands, ranges, limits)])
    chosen = cands.filter(pa.array(rule.chosen(cands)))
    if chosen.num_rows < budget:
        log.warning(
            "only %d of the budget of %d pseudo-labels pass min_confidence=%.3f (pool: %s candidates)",
            chosen.num_rows, budget, min_confidence, cands.num_rows,
        )
    order = pc.sort_indices(chosen, sort_keys=[(c, "ascending") for c in SEL])
    return chosen.take(order).select(SELECTION_SCHEMA.names)



def preds(rows: list[tuple[str, int, float]]) -> pa.Table:
    ids, pred, conf = zip(*rows) if rows else ((), (), ())
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "pred": pa.array(pred, pa.int16()),
            "confidence": pa.array(conf, pa.float32()),
            "probs": pa.array([[c, 1 - c] for c in conf], pa.list_(pa.float32())),
        }
    )


ROWS = [
    ("a", 0, 0.99),
    ("b", 0, 0.97),
    ("c", 0, 0.95),
    ("d", 0, 0.93),
    ("e", 1, 0.90),
    ("f", 1, 0.60),
    ("g", 2, 0.85),
    ("h", 2, 0.50),
]


def class_counts(selection: pa.Table, num_classes: int) -> list[int]:
    return np.bincount(selection.column("pred").to_numpy().astype(np.int64), minlength=num_classes).tolist()


def ids(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


def test_top_n_by_confidence():
    sel = select_pseudo_labels(preds(ROWS), None, 3, 3)
    assert ids(sel) == ["a", "b", "c"]
    assert sel.column_names == ["id", "pred", "confidence"]
    assert sel.schema.field("pred").type == pa.int16()


def test_row_order_does_not_matter_and_ties_break_by_id():
    rows = [("z", 0, 0.8), ("m", 1, 0.8), ("k", 0, 0.8), ("q", 1, 0.9)]
    expected = ["q", "k", "m"]
    for seed in range(5):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert ids(select_pseudo_labels(preds(shuffled), None, 3, 2)) == expected


def test_pool_filter():
    pool = {"c", "e", "f", "h"}
    assert ids(select_pseudo_labels(preds(ROWS), pool, 2, 3)) == ["c", "e"]


def test_class_balanced_even_split():
    sel = select_pseudo_labels(preds(ROWS), None, 6, 3, prior=[1.0, 1.0, 1.0])
    assert sorted(ids(sel)) == ["a", "b", "e", "f", "g", "h"]
    assert class_counts(sel, 3) == [2, 2, 2]
    conf = sel.column("confidence").to_pylist()
    assert conf == sorted(conf, reverse=True)  # result is still most confident first


def test_class_balanced_remainder_goes_by_confidence():
    # 4 over 3 classes: one each, then the one leftover slot to the most confident remaining (b).
    sel = select_pseudo_labels(preds(ROWS), None, 4, 3, prior=[1.0, 1.0, 1.0])
    assert sorted(ids(sel)) == ["a", "b", "e", "g"]


def test_class_balanced_shortfall_is_redistributed():
    # Class 1 has one candidate in the pool, class 2 none: their shortfall goes to class 0 by confidence.
    pool = {"a", "b", "c", "d", "e"}
    sel = select_pseudo_labels(preds(ROWS), pool, 4, 3, prior=[1.0, 1.0, 1.0])
    assert sorted(ids(sel)) == ["a", "b", "c", "e"]
    assert class_counts(sel, 3) == [3, 1, 0]


def test_class_balanced_differs_from_top_n():
    top = select_pseudo_labels(preds(ROWS), None, 3, 3)
    bal = select_pseudo_labels(preds(ROWS), None, 3, 3, prior=[1.0, 1.0, 1.0])
    assert class_counts(top, 3) == [3, 0, 0]
    assert class_counts(bal, 3) == [1, 1, 1]
    assert ids(bal) == ["a", "e", "g"]


def test_min_confidence_returns_fewer_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="raysemi.pseudolabel"):
        sel = select_pseudo_labels(preds(ROWS), None, 6, 3, min_confidence=0.9)
    assert ids(sel) == ["a", "b", "c", "d", "e"]
    assert "only 5 of the budget of 6" in caplog.text
    with caplog.at_level(logging.WARNING, logger="raysemi.pseudolabel"):
        bal = select_pseudo_labels(preds(ROWS), None, 3, 3, prior=[1.0, 1.0, 1.0], min_confidence=0.9)
    assert sorted(ids(bal)) == ["a", "b", "e"]  # class 2 has no confident candidate: class 0 fills in


def test_budget_larger_than_pool():
    check_budget(8, 8)
    with pytest.raises(RaysemiError, match=r"pseudolabel.budget=9 is larger than the unlabeled pool \(8 images\)"):
        check_budget(9, 8)
    assert len(select_pseudo_labels(preds(ROWS), None, 100, 3)) == len(ROWS)
    assert len(select_pseudo_labels(preds(ROWS), None, 100, 3, prior=[1.0, 1.0, 1.0])) == len(ROWS)


def test_refuses_duplicate_ids_and_bad_classes():
    with pytest.raises(RaysemiError, match="more than once"):
        select_pseudo_labels(preds([*ROWS, ("a", 1, 0.1)]), None, 2, 3)
    with pytest.raises(RaysemiError, match="outside"):
        select_pseudo_labels(preds(ROWS), None, 2, 2)


def test_empty():
    sel = select_pseudo_labels(preds([]), None, 0, 3, prior=[1.0, 1.0, 1.0])
    assert sel.num_rows == 0


def test_prior_shares_follow_the_labelled_counts():
    # Labelled counts 2:1:1 -> a budget of 4 gives quotas 2, 1, 1.
    prior = selection_prior("prior", [2, 1, 1])
    assert prior == [2.0, 1.0, 1.0]
    sel = select_pseudo_labels(preds(ROWS), None, 4, 3, prior=prior)
    assert class_counts(sel, 3) == [2, 1, 1]
    assert sorted(ids(sel)) == ["a", "b", "e", "g"]
    # A majority-heavy prior gives class 0 more of the budget than a uniform one would.
    heavy = select_pseudo_labels(preds(ROWS), None, 6, 3, prior=[4.0, 1.0, 1.0])
    assert class_counts(heavy, 3) == [4, 1, 1]


def test_selection_rules_and_bad_priors():
    assert selection_prior("top", [1, 1]) is None
    assert selection_prior("balanced", [3, 0, 0]) == [1.0, 1.0, 1.0]
    with pytest.raises(RaysemiError, match="does not fit 3 classes"):
        select_pseudo_labels(preds(ROWS), None, 4, 3, prior=[1.0, 1.0])
    with pytest.raises(RaysemiError, match="does not fit"):
        select_pseudo_labels(preds(ROWS), None, 4, 3, prior=[0.0, 0.0, 0.0])


def test_budget_as_fraction_or_count():
    assert budget_count(0.2, 490) == 98
    assert budget_count(0.25, 2400) == 600
    assert budget_count(1.0, 37) == 37
    assert budget_count(0.001, 10) == 1  # never zero on a non-empty pool
    assert budget_count(500.0, 2400) == 500
    assert budget_count(0.5, 0) == 0


# ------------------------------------------------ the rule over many shards = the in-memory reference


def reference_selection(table: pa.Table, budget: int, prior: list[float] | None) -> set[str]:
    """The selection as it was written before it moved to shards: a full sort, then quotas in order."""
    rows = sorted(zip((-np.asarray(table.column("confidence").to_numpy())).tolist(),
                      table.column("id").to_pylist(), table.column("pred").to_pylist()))
    if prior is None or budget >= len(rows):
        return {r[1] for r in rows[:budget]}
    share = np.asarray(prior) / sum(prior)
    quotas = np.floor(budget * share + 1e-9).astype(int)
    take = np.zeros(len(rows), bool)
    for c, q in enumerate(quotas):
        idx = [i for i, r in enumerate(rows) if r[2] == c][:q]
        take[idx] = True
    rest = np.flatnonzero(~take)[: budget - int(take.sum())]
    take[rest] = True
    return {rows[i][1] for i in np.flatnonzero(take)}


@pytest.mark.parametrize("prior", [None, [1.0, 1.0, 1.0], [5.0, 1.0, 0.5]])
@pytest.mark.parametrize("budget", [1, 777, 2999, 5000])
def test_the_rule_over_shards_chooses_what_the_full_sort_chooses(prior, budget):
    from raysemi.stages.selection import candidates, class_counts_of, plan_selection, range_summaries

    rng = np.random.default_rng(budget)
    n = 5000
    conf = (rng.integers(0, 40, n) / 40).astype(np.float32)  # many ties: the id breaks them
    table = preds([(f"x{i:05d}", int(rng.choice(3, p=[0.7, 0.25, 0.05])), float(c))
                   for i, c in zip(rng.permutation(n), conf)])
    parts = [candidates(table.slice(a, 613), 3) for a in range(0, n, 613)]  # 9 shards
    rule = plan_selection([sum(x) for x in zip(*(class_counts_of(p, 3) for p in parts))], budget, prior,
                          lambda ranges, limits: [range_summaries(p, ranges, limits) for p in parts])
    chosen = {i for p in parts for i in p.filter(pa.array(rule.chosen(p))).column("id").to_pylist()}
    assert chosen == reference_selection(table, budget, prior)
    assert len(chosen) == min(budget, n)
