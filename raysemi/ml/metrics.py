"""Classification and pseudo-label metrics as pure functions of arrays (no torch, no I/O).

Everything returned is plain Python (int, float, None, list, dict), so the result goes straight into
``report.json``. The metrics themselves come from scikit-learn; only the calibration error (which
scikit-learn lacks) is computed here, following Guo et al. 2017, "On Calibration of Modern Neural
Networks" (arXiv 1706.04599), eq. 3.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

ECE_BINS = 15  # Guo et al. 2017 use M = 15 equal-width bins
UNKNOWN = -1  # the "no ground truth" marker in pseudo_label_precision


def _int_labels(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array; a ValueError when it is not 1-D or not integer-valued."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    # Labels read back from Parquet/pandas may arrive as float; accept them only when exactly integral.
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")


def _check_probs(probs: Any, n: int, n_classes: int) -> np.ndarray:
    """``probs`` as a float64 (n, n_classes) array of probabilities, or a ValueError saying why not."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"y_true has {n} labels but probs has {arr.shape[0]} rows")
    if arr.shape[1] != n_classes:
        raise ValueError(f"probs has {arr.shape[1]} columns but there are {n_classes} class names")
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs contains NaN or inf")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError("probs must lie in [0, 1] (softmax probabilities, not logits)")
    # Loose tolerance: float16/bf16 softmax outputs are off by ~1e-3, and that is not a bug.
    sums = arr.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-2):
        worst = float(sums[np.argmax(np.abs(sums - 1.0))])
        raise ValueError(f"probs rows must sum to 1 (softmax probabilities); one row sums to {worst:.4f}")
    return arr


def reliability_bins(confidences: Any, correct: Any, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per-bin accuracy, mean confidence and count over ``n_bins`` equal-width bins of [0, 1].

    Bin m holds confidences in (edges[m], edges[m+1]] (Guo et al.'s right-closed bins); a confidence of
    exactly 0 goes to the first bin. Empty bins report ``None`` for accuracy and confidence (not NaN,
    which JSON cannot hold).
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(correct)
    if conf.ndim != 1 or hit.ndim != 1:
        raise ValueError(f"confidences and correct must be 1-D, got shapes {conf.shape} and {hit.shape}")
    if conf.shape != hit.shape:
        raise ValueError(f"confidences has {conf.size} values but correct has {hit.size}")
    if conf.size == 0:
        raise ValueError("no samples: calibration needs at least one prediction")
    if not np.all(np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("confidences must be finite and lie in [0, 1]")
    hit = hit.astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    # searchsorted on the interior edges with side="left" gives bin m for edges[m] < c <= edges[m+1].
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=hit, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    accuracy = [float(a / c) if c else None for a, c in zip(acc_sum, counts)]
    confidence = [float(s / c) if c else None for s, c in zip(conf_sum, counts)]
    return {
        "edges": [float(e) for e in edges],
        "accuracy": accuracy,
        "confidence": confidence,
        "count": [int(c) for c in counts],
    }


def _ece_from_bins(bins: dict[str, list]) -> float:
    n = sum(bins["count"])
    return float(
        sum(
            c / n * abs(a - f)
            for a, f, c in zip(bins["accuracy"], bins["confidence"], bins["count"])
            if c  # empty bins carry no weight
        )
    )


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. 2017).

    ``confidences`` are the top-class probabilities, ``correct`` whether each top-class prediction was right.
    """
    return _ece_from_bins(reliability_bins(confidences, correct, n_bins))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1, OvR AUC, ECE, confusion, reliability.

    ``probs`` is (N, C) softmax output; the prediction is its argmax. Conventions:

    - ``macro_f1`` averages over the classes present in ``y_true`` or in the predictions (scikit-learn's
      default), so a class absent from both does not drag the mean down with a meaningless 0;
      ``per_class`` lists every class, with 0 where a ratio is undefined.
    - ``balanced_accuracy`` is the mean recall over the classes present in ``y_true`` (scikit-learn).
    - ``auc_ovr`` is the macro one-vs-rest ROC AUC (``probs[:, 1]`` when C == 2). It is undefined when a
      class has no positive example, so it is then ``None`` and ``auc_note`` says which class is absent.
    - ``confusion`` has rows = true class, columns = predicted class, over all C classes.
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if len(set(names)) != n_classes:
        raise ValueError(f"class names must be unique, got {names}")
    y = _int_labels(y_true, "y_true")
    if y.size == 0:
        raise ValueError("y_true is empty: no samples to evaluate")
    p = _check_probs(probs, y.size, n_classes)
    if y.min() < 0 or y.max() >= n_classes:
        bad = sorted({int(v) for v in y[(y < 0) | (y >= n_classes)]})[:5]
        raise ValueError(f"y_true holds labels outside [0, {n_classes}): {bad}")

    labels = list(range(n_classes))
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)

    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }

    with warnings.catch_warnings():
        # It warns when the predictions hold a class absent from y_true; the value is still the mean
        # recall over the present classes, which is what we want.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, pred)
    out: dict[str, Any] = {
        "n": int(y.size),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "per_class": per_class,
    }

    absent = [names[c] for c in labels if not np.any(y == c)]
    if absent:
        out["auc_ovr"] = None
        out["auc_note"] = f"ROC AUC undefined: no true examples of class(es) {', '.join(absent)}"
    else:
        # Renormalise rows: scikit-learn's multiclass AUC demands rows summing to 1 within 1e-5,
        # tighter than half-precision softmax delivers; the ranking (all AUC depends on) is unchanged.
        p_norm = p / p.sum(axis=1, keepdims=True)
        if n_classes == 2:
            auc = roc_auc_score(y, p_norm[:, 1])
        else:
            auc = roc_auc_score(y, p_norm, multi_class="ovr", average="macro", labels=labels)
        out["auc_ovr"] = float(auc)

    bins = reliability_bins(conf, pred == y, ECE_BINS)
    out["ece"] = _ece_from_bins(bins)
    out["confusion"] = confusion_matrix(y, pred, labels=labels).astype(int).tolist()
    out["reliability"] = bins
    return out


def pseudo_label_precision(
    true_labels: np.ndarray, pseudo_labels: np.ndarray, class_names: list[str] | None = None
) -> dict:
    """How many selected pseudo-labels match the hidden truth, where a truth is known (-1 = unknown).

    On benchmark data the "unlabeled" images do have labels, hidden from training; this measures the
    pseudo-labeler against them. Returns ``n_selected``, ``n_with_truth``, ``n_correct``, ``precision``
    (``None`` when no selected row has a truth) and ``per_class``: for each pseudo-label class (by name
    when ``class_names`` is given, else by the index as a string; every class when names are given) the
    same four counts, i.e. the precision of each predicted class.
    """
    truth = _int_labels(true_labels, "true_labels")
    pseudo = _int_labels(pseudo_labels, "pseudo_labels")
    if truth.size != pseudo.size:
        raise ValueError(f"true_labels has {truth.size} values but pseudo_labels has {pseudo.size}")
    if truth.size and truth.min() < UNKNOWN:
        raise ValueError(f"true_labels must be class indices or {UNKNOWN} (unknown), got {int(truth.min())}")
    if pseudo.size and pseudo.min() < 0:
        raise ValueError(f"pseudo_labels must be class indices >= 0, got {int(pseudo.min())}")
    if class_names is not None:
        n_classes = len(class_names)
        for arr, name in ((pseudo, "pseudo_labels"), (truth, "true_labels")):
            if arr.size and arr.max() >= n_classes:
                raise ValueError(
                    f"{name} holds {int(arr.max())}, outside [0, {n_classes}) for {n_classes} classes"
                )
        classes = list(range(n_classes))
        keys = [str(c) for c in class_names]
    else:
        classes = sorted({int(c) for c in pseudo})
        keys = [str(c) for c in classes]

    k = max(classes, default=-1) + 1
    known = truth != UNKNOWN
    confusion = np.zeros((k, max(k, int(truth.max(initial=-1)) + 1)), dtype=np.int64)
    np.add.at(confusion, (pseudo[known], truth[known]), 1)
    unknown = np.bincount(pseudo[~known], minlength=k)
    return precision_from_counts(confusion, unknown, keys, classes)


def precision_from_counts(confusion: np.ndarray, unknown: np.ndarray, keys: list[str],
                          classes: list[int] | None = None) -> dict:
    """``pseudo_label_precision``'s figures from counts: ``confusion[pred, truth]`` of the rows whose truth
    is known, ``unknown[pred]`` of the others; ``keys`` names the classes ``classes`` (default: all)."""
    confusion, unknown = np.asarray(confusion, dtype=np.int64), np.asarray(unknown, dtype=np.int64)
    classes = list(range(len(keys))) if classes is None else classes

    def counts(rows: list[int]) -> dict[str, Any]:
        n_known = int(confusion[rows].sum())
        n_correct = int(sum(confusion[c, c] for c in rows if c < confusion.shape[1]))
        return {
            "n_selected": n_known + int(unknown[rows].sum()),
            "n_with_truth": n_known,
            "n_correct": n_correct,
            "precision": n_correct / n_known if n_known else None,
        }

    out = counts(list(range(len(unknown))))
    out["per_class"] = {key: counts([c]) for key, c in zip(keys, classes)}
    return out


def best_round(scores: Sequence[float]) -> int:
    """The method's rule for the round it keeps: the highest validation score (``run.select_metric``), the
    earliest round on a tie (fewer pseudo-labels). The pipeline, its report and Tune's best-so-far use it."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
