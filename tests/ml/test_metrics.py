"""Metrics against scikit-learn and hand-computed values; calibration; pseudo-label precision; checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from raysemi.ml.metrics import (
    best_round,
    classification_metrics,
    expected_calibration_error,
    pseudo_label_precision,
    reliability_bins,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fixture(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax outputs of a noisy but better-than-chance classifier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    return y, _softmax(logits)


def _reference_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al. 2017 eq. 3 written as a plain loop over (lo, hi] bins."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


@pytest.mark.parametrize("n_classes", [3, 2])
def test_matches_sklearn(n_classes):
    y, probs = _fixture(500, n_classes, seed=n_classes)
    names = [f"class_{i}" for i in range(n_classes)]
    pred = probs.argmax(axis=1)
    m = classification_metrics(y, probs, names)

    assert m["n"] == 500
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert 0.4 < m["accuracy"] < 0.95  # a real, imperfect classifier: the comparison means something
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    if n_classes == 2:
        auc = roc_auc_score(y, probs[:, 1])
    else:
        auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["auc_ovr"] == pytest.approx(auc)
    assert "auc_note" not in m
    assert m["confusion"] == confusion_matrix(y, pred).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred)
    for i, name in enumerate(names):
        assert m["per_class"][name] == pytest.approx(
            {"precision": prec[i], "recall": rec[i], "f1": f1[i], "support": sup[i]}
        )
    conf = probs.max(axis=1)
    assert m["ece"] == pytest.approx(_reference_ece(conf, (pred == y).astype(float)))
    assert m["ece"] == pytest.approx(expected_calibration_error(conf, pred == y))
    # The reliability bins are the ones the ECE came from.
    rel = m["reliability"]
    assert len(rel["edges"]) == 16 and len(rel["count"]) == 15
    assert sum(rel["count"]) == 500
    # Strict JSON (no NaN), and nothing numpy left in it.
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_ece_hand_computed():
    # Two predictions at 0.9 (bin 13), one right; two at 0.5 (bin 7), both right:
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.5| = 0.2 + 0.25 = 0.45
    conf = np.array([0.9, 0.9, 0.5, 0.5])
    correct = np.array([True, False, True, True])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.45)
    # One bin holding everything: |mean(correct) - mean(conf)| = |0.75 - 0.7| = 0.05.
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.05)

    # The same through classification_metrics: 3 classes, the top probability is the confidence.
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    y = np.array([0, 1, 0, 1])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["ece"] == pytest.approx(0.45)
    rel = m["reliability"]
    assert rel["count"][13] == 2 and rel["count"][7] == 2 and sum(rel["count"]) == 4
    assert rel["accuracy"][13] == pytest.approx(0.5) and rel["confidence"][13] == pytest.approx(0.9)
    assert rel["accuracy"][7] == pytest.approx(1.0) and rel["confidence"][7] == pytest.approx(0.5)
    assert rel["accuracy"][0] is None and rel["confidence"][0] is None  # empty bin: None, not NaN


def test_ece_zero_when_calibrated_by_construction():
    # In each bin the fraction correct equals the (single) confidence value used there.
    conf, correct = [], []
    for c, n in [(0.4, 10), (0.6, 20), (0.8, 40), (1.0, 5)]:
        k = round(c * n)
        conf += [c] * n
        correct += [True] * k + [False] * (n - k)
    assert expected_calibration_error(np.array(conf), np.array(correct)) == pytest.approx(0.0, abs=1e-12)
    # And fully over-confident: confidence 1.0 but always wrong -> ECE 1.
    assert expected_calibration_error(np.ones(8), np.zeros(8, dtype=bool)) == pytest.approx(1.0)


def test_bins_are_right_closed():
    edges = reliability_bins([0.5], [True])["edges"]
    # A confidence exactly on an edge belongs to the bin below it; 0 goes to the first bin.
    bins = reliability_bins([edges[2], 0.0, 1.0], [True, True, True])
    assert bins["count"][1] == 1 and bins["count"][0] == 1 and bins["count"][14] == 1


def test_absent_class_gives_no_auc_and_no_crash():
    y, probs = _fixture(60, 3, seed=7)
    y = np.where(y == 2, 0, y)  # class "c" never occurs in the truth
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["auc_ovr"] is None
    assert "c" in m["auc_note"]
    assert len(m["confusion"]) == 3 and all(len(r) == 3 for r in m["confusion"])
    assert m["confusion"][2] == [0, 0, 0]
    assert m["per_class"]["c"]["support"] == 0 and m["per_class"]["c"]["recall"] == 0.0
    pred = probs.argmax(axis=1)
    assert m["balanced_accuracy"] == pytest.approx(
        np.mean([np.mean(pred[y == c] == c) for c in (0, 1)])  # mean recall over present classes
    )
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))


def test_float_labels_accepted_when_integral():
    y, probs = _fixture(30, 3, seed=1)
    assert classification_metrics(y.astype(np.float32), probs, list("abc")) == classification_metrics(
        y, probs, list("abc")
    )


@pytest.mark.parametrize(
    ("y", "probs", "names", "match"),
    [
        (np.zeros(4, int), np.full((5, 2), 0.5), ["a", "b"], "4 labels but probs has 5 rows"),
        (np.zeros(4, int), np.full(4, 0.5), ["a", "b"], "2-D"),
        (np.zeros((4, 1), int), np.full((4, 2), 0.5), ["a", "b"], "1-D"),
        (np.array([0, 1, 2, 0]), np.full((4, 2), 0.5), ["a", "b"], r"outside \[0, 2\)"),
        (np.array([0, 1, -1, 0]), np.full((4, 2), 0.5), ["a", "b"], r"outside \[0, 2\)"),
        (np.zeros(4, int), np.full((4, 3), 1 / 3), ["a", "b"], "3 columns but there are 2 class names"),
        (np.zeros(4, int), np.array([[2.0, -1.0]] * 4), ["a", "b"], "logits"),
        (np.zeros(4, int), np.full((4, 2), 0.4), ["a", "b"], "sum to 1"),
        (np.zeros(4, int), np.full((4, 2), np.nan), ["a", "b"], "NaN"),
        (np.array([0.5, 1, 0, 0]), np.full((4, 2), 0.5), ["a", "b"], "integer"),
        (np.zeros(0, int), np.zeros((0, 2)), ["a", "b"], "empty"),
        (np.zeros(4, int), np.full((4, 1), 1.0), ["a"], "at least 2 classes"),
        (np.zeros(4, int), np.full((4, 2), 0.5), ["a", "a"], "unique"),
    ],
)
def test_bad_inputs_raise(y, probs, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs, names)


def test_ece_bad_inputs_raise():
    with pytest.raises(ValueError, match="3 values but correct has 2"):
        expected_calibration_error([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [True], n_bins=0)
    with pytest.raises(ValueError, match="no samples"):
        expected_calibration_error([], [])


def test_pseudo_label_precision_with_unknowns():
    truth = np.array([0, 1, -1, 2, 2, -1, 1])
    pseudo = np.array([0, 2, 1, 2, 1, 1, 1])
    # Rows with a truth: 0, 1, 3, 4, 6; correct: 0 (0=0), 3 (2=2), 6 (1=1); wrong: 1 (1->2), 4 (2->1).
    # Per pseudo class: 0 -> row 0 (right); 1 -> rows 2?, 4 x, 5?, 6 ok; 2 -> rows 1 x, 3 ok.
    r = pseudo_label_precision(truth, pseudo)
    assert r["n_selected"] == 7
    assert r["n_with_truth"] == 5
    assert r["n_correct"] == 3
    assert r["precision"] == pytest.approx(3 / 5)
    assert r["per_class"] == {
        "0": {"n_selected": 1, "n_with_truth": 1, "n_correct": 1, "precision": 1.0},
        "1": {"n_selected": 4, "n_with_truth": 2, "n_correct": 1, "precision": 0.5},
        "2": {"n_selected": 2, "n_with_truth": 2, "n_correct": 1, "precision": 0.5},
    }
    # With names: every class is listed, even one never pseudo-labeled.
    named = pseudo_label_precision(truth, pseudo, class_names=["a", "b", "c", "d"])
    assert named["per_class"]["b"]["n_selected"] == 4
    assert named["per_class"]["d"] == {"n_selected": 0, "n_with_truth": 0, "n_correct": 0, "precision": None}
    assert json.loads(json.dumps(named, allow_nan=False)) == named


def test_pseudo_label_precision_without_truth_or_selection():
    r = pseudo_label_precision(np.full(3, -1), np.array([0, 1, 1]))
    assert (r["n_selected"], r["n_with_truth"], r["precision"]) == (3, 0, None)
    empty = pseudo_label_precision(np.array([], dtype=int), np.array([], dtype=int))
    assert (empty["n_selected"], empty["precision"], empty["per_class"]) == (0, None, {})


def test_pseudo_label_precision_bad_inputs():
    with pytest.raises(ValueError, match="3 values but pseudo_labels has 2"):
        pseudo_label_precision(np.array([0, 1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown"):
        pseudo_label_precision(np.array([-2]), np.array([0]))
    with pytest.raises(ValueError, match=">= 0"):
        pseudo_label_precision(np.array([0]), np.array([-1]))
    with pytest.raises(ValueError, match="outside"):
        pseudo_label_precision(np.array([0]), np.array([3]), class_names=["a", "b"])


def test_best_round_is_the_highest_score_and_the_earliest_on_a_tie():
    assert best_round([0.8, 0.7, 0.8]) == 0  # a tie goes to the earlier round (fewer pseudo-labels)
    assert best_round([0.5, 0.6, 0.6]) == 1
    assert best_round([0.5, 0.6, 0.7]) == 2  # the last round when it is the best, and only then
    assert best_round([0.9]) == 0
