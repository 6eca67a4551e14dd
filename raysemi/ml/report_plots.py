"""The report's plots (PNG): confusion matrix, accuracy per round, reliability diagram.

Each figure is drawn on its own ``Figure`` with the Agg canvas attached explicitly: no pyplot state is
touched, so the functions are safe in Ray workers and threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raysemi.core.io import write_bytes_atomic


def _save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: no dependence on the default backend
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(str(path), buf.getvalue())


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    """Confusion matrix heat map (rows = true, columns = predicted) with the count in every cell."""
    cm = np.asarray(confusion, dtype=np.int64)
    n = cm.shape[0]
    side = max(4.0, 0.9 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test)")
    threshold = cm.max() / 2.0 if cm.size else 0.0
    for i in range(n):
        for j in range(n):
            # White on dark cells, black on light ones, so every count stays readable.
            colour = "white" if cm[i, j] > threshold else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=9)
    _save_figure(fig, path)


def plot_rounds(rounds: list[Mapping[str, Any]], best_round: int | None, path: Path) -> None:
    """Validation accuracy and pseudo-label precision per round; the kept (best) round is marked."""
    xs = [i if r.get("round") is None else int(r["round"]) for i, r in enumerate(rounds)]
    # NaN (not None) for missing values: matplotlib leaves a gap there instead of failing.
    val = [_num((r.get("val") or {}).get("accuracy")) for r in rounds]
    prec = [_num(r.get("pseudo_precision")) for r in rounds]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.plot(xs, val, marker="o", label="val accuracy")
    if not all(math.isnan(v) for v in prec):
        ax.plot(xs, prec, marker="s", linestyle="--", label="pseudo-label precision")
    if best_round is not None and best_round in xs:
        ax.axvline(best_round, color="grey", linestyle=":", label=f"best round ({best_round})")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel("fraction")
    ax.set_ylim(0.0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Validation accuracy and pseudo-label precision per round")
    _save_figure(fig, path)


def plot_reliability(reliability: Mapping[str, list], ece: float | None, path: Path) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration."""
    edges = np.asarray(reliability["edges"], dtype=np.float64)
    acc = np.array([_num(a) for a in reliability["accuracy"]])
    conf = np.array([_num(c) for c in reliability["confidence"]])
    counts = np.asarray(reliability["count"], dtype=np.float64)
    width = np.diff(edges)
    filled = counts > 0
    fig = Figure(figsize=(5.0, 6.0))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        edges[:-1][filled],
        acc[filled],
        width=width[filled],
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy",
    )
    # The gap to each bin's mean confidence is what the ECE sums (weighted by the bin's share).
    ax.bar(
        edges[:-1][filled],
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width[filled],
        align="edge",
        color="red",
        alpha=0.25,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    title = "Reliability (test)"
    if ece is not None:
        title += f", ECE = {ece:.4f}"
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax_count.bar(edges[:-1], counts, width=width, align="edge", edgecolor="black", color="grey")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    _save_figure(fig, path)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
