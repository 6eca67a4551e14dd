"""The heat map of a sweep: test accuracy over pretraining epochs x learning rate (the paper's Table 1)."""

from __future__ import annotations

import io
import itertools
from typing import Any

from raysemi.core.config import Config
from raysemi.core.tables import fmt

HEATMAP_AXES = ("pretrain.epochs", "pretrain.lr")
MAX_HEATMAP_VALUES = 12


def axis_value(row: dict[str, Any], key: str, base: Config) -> Any:
    """A row's value of ``key``: the sampled one, else the base config's."""
    if key in row:
        return row[key]
    section, name = key.split(".")
    return getattr(getattr(base, section), name)


def heatmap_png(rows: list[dict[str, Any]], base: Config, title: str) -> bytes | None:
    """Test accuracy over pretraining epochs x lr (the paper's Table 1): per cell the trial with the best
    validation accuracy; under each epoch count the mean computation time of its distinct pretrainings."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "completed" and r["test_accuracy"] is not None]
    if not done:
        return None
    ex, ey = HEATMAP_AXES
    xs = sorted({axis_value(r, ex, base) for r in done})
    ys = sorted({axis_value(r, ey, base) for r in done}, reverse=True)
    if len(xs) > MAX_HEATMAP_VALUES or len(ys) > MAX_HEATMAP_VALUES:
        return None
    acc = np.full((len(ys), len(xs)), np.nan)
    val = np.full_like(acc, np.nan)
    for r in done:
        i, j = ys.index(axis_value(r, ey, base)), xs.index(axis_value(r, ex, base))
        if np.isnan(val[i, j]) or r["val_accuracy"] > val[i, j]:
            val[i, j], acc[i, j] = r["val_accuracy"], r["test_accuracy"]
    fig = Figure(figsize=(1.8 + 1.6 * len(xs), 1.4 + 0.9 * len(ys)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="test accuracy")
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        text = "n/a" if np.isnan(acc[i, j]) else f"{acc[i, j]:.3f}\n(val {val[i, j]:.3f})"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if np.isnan(acc[i, j]) or acc[i, j] > np.nanmean(acc) else "white")
    labels = []
    for x in xs:
        costs = {r["pretrain_key"]: r["pretrain_cost_s"] for r in done
                 if axis_value(r, ex, base) == x and r["pretrain_cost_s"] is not None}
        labels.append(f"{x}\n{np.mean(list(costs.values())) / 60:.1f} min" if costs else str(x))
    ax.set_xticks(range(len(xs)), labels)
    ax.set_yticks(range(len(ys)), [fmt(y) for y in ys])
    ax.set_xlabel(f"{ex} (mean pretraining time)")
    ax.set_ylabel(ey)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()

