"""The run report: ``report.json``, ``report.md`` and PNG plots, written atomically into one folder.

The report dict (every key optional except where the evaluate stage must provide it; absent or ``None``
values render as "n/a" and their plot is skipped)::

    {
      "run": {"name": str, "mode": "full" | "byol_finetune" | "supervised",
              "head": "projector" | "encoder", "dataset": str, "config_path": str,
              "started": ISO-8601 str, "backbone": str},
      "classes": [str, ...],                       # class names, index order
      "data": {"n_train_labeled": int, "n_unlabeled": int, "n_val": int, "n_test": int},
      "stages": {"pretrain": s, "finetune": s, "round_1": s, ..., "evaluate": s},   # wall seconds
      "rounds": [                                  # round 0 = fine-tuning on the labeled set only
        {"round": 0, "val": <classification_metrics dict> | None, "n_pseudo": 0,
         "pseudo_precision": float | None, "train_rows": int, "steps": int, "images_seen": int,
         "seconds": float},
        {"round": 1, ...},
      ],
      "best_round": int,                           # the round whose model is evaluated on test
      "test": <classification_metrics dict>,       # raysemi.metrics.classification_metrics
    }

Files: ``confusion_matrix.png`` (test confusion, counts), ``accuracy_per_round.png`` (val accuracy and
pseudo-label precision per round), ``reliability.png`` (test reliability diagram), ``report.md``, and
``report.json`` last: an existing ``report.json`` is removed first and written again only after every
other file is in place, so its presence means the report is complete.

Local folders only (written atomically through ``raysemi.io``); to publish to ``s3://``, write locally and copy.
Plots use matplotlib's object API on an Agg canvas, never pyplot, so no global backend or figure state
is touched and the function is safe in Ray workers and threads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raysemi.io import write_bytes_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
ROUNDS_PNG = "accuracy_per_round.png"
RELIABILITY_PNG = "reliability.png"
PLOTS = {"confusion_matrix": CONFUSION_PNG, "accuracy_per_round": ROUNDS_PNG, "reliability": RELIABILITY_PNG}

__all__ = ["jsonable", "render_markdown", "write_report"]


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, tuples and Paths made plain, and NaN/inf made ``None``.

    Strict JSON has no NaN, and a metric that came out NaN is better reported as missing than as an
    invalid file.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: no dependence on the default backend
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(str(path), buf.getvalue())


def _test(report: Mapping[str, Any]) -> Mapping[str, Any]:
    return report.get("test") or {}


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


# --- Markdown -------------------------------------------------------------------------------------

NA = "n/a"


def fmt(value: Any, digits: int = 4) -> str:
    """A value as the report shows it: floats with ``digits`` decimals, "n/a" for missing, else ``str``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_seconds(seconds: Any) -> str:
    """Wall time as "1h 02m 03s", "2m 03s" or "4.2s"."""
    if seconds is None:
        return NA
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """The report as Markdown; ``images`` maps plot keys (as in ``write_report``) to relative paths."""
    images = images or {}
    run = report.get("run") or {}
    classes = [str(c) for c in report.get("classes") or []]
    data = report.get("data") or {}
    rounds = report.get("rounds") or []
    best = report.get("best_round")
    test = _test(report)

    lines = [f"# raysemi report: {run.get('name') or 'unnamed run'}", "", "## Run", ""]
    for key in ("name", "mode", "head", "dataset", "backbone", "select_metric", "selection", "soft_targets",
                "config_path", "started"):
        if run.get(key) is not None:
            lines.append(f"- **{key}**: {run[key]}")
    if classes:
        lines.append(f"- **classes** ({len(classes)}): {', '.join(classes)}")
    for key in ("n_train_labeled", "n_unlabeled", "n_val", "n_test"):
        if data.get(key) is not None:
            lines.append(f"- **{key}**: {data[key]}")

    if rounds:
        lines += ["", "## Rounds", ""]
        rows = []
        for r in rounds:
            val = r.get("val") or {}
            label = (
                f"{r.get('round')} (best)" if r.get("round") == best and best is not None else r.get("round")
            )
            rows.append(
                [
                    label,
                    fmt(r.get("train_rows")),
                    fmt(r.get("n_pseudo")),
                    fmt(r.get("pseudo_precision")),
                    fmt(r.get("steps")),
                    fmt(r.get("images_seen")),
                    fmt(val.get("accuracy")),
                    fmt(val.get("balanced_accuracy")),
                    fmt(val.get("macro_f1")),
                ]
            )
        lines += _table(
            [
                "round",
                "train rows",
                "pseudo-labels added",
                "pseudo-label precision",
                "optimizer steps",
                "images seen",
                "val accuracy",
                "val balanced accuracy",
                "val macro-F1",
            ],
            rows,
        )

    if test:
        suffix = f" (model of round {best})" if best is not None else ""
        lines += ["", f"## Test metrics{suffix}", ""]
        auc = fmt(test.get("auc_ovr"))
        if test.get("auc_ovr") is None and test.get("auc_note"):
            auc = f"{NA} ({test['auc_note']})"
        lines += _table(
            ["metric", "value"],
            [
                ["samples", fmt(test.get("n"))],
                ["accuracy", fmt(test.get("accuracy"))],
                ["balanced accuracy", fmt(test.get("balanced_accuracy"))],
                ["macro-F1", fmt(test.get("macro_f1"))],
                ["ROC AUC (macro one-vs-rest)", auc],
                ["ECE (15 bins)", fmt(test.get("ece"))],
            ],
        )
        per_class = test.get("per_class") or {}
        if per_class:
            lines += ["", "### Per class (test)", ""]
            lines += _table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    [
                        name,
                        fmt(m.get("precision")),
                        fmt(m.get("recall")),
                        fmt(m.get("f1")),
                        fmt(m.get("support")),
                    ]
                    for name, m in per_class.items()
                ],
            )
        confusion = test.get("confusion")
        if confusion:
            names = classes if len(classes) == len(confusion) else [str(i) for i in range(len(confusion))]
            lines += ["", "### Confusion matrix (test; rows = true, columns = predicted)", ""]
            lines += _table(
                ["true \\ predicted", *names], [[names[i], *row] for i, row in enumerate(confusion)]
            )

    titles = {
        "confusion_matrix": "Confusion matrix",
        "accuracy_per_round": "Accuracy per round",
        "reliability": "Reliability diagram",
    }
    shown = [(titles.get(key, key), path) for key, path in images.items()]
    if shown:
        lines += ["", "## Plots", ""]
        for title, path in shown:
            lines += [f"![{title}]({path})", ""]
        lines.pop()

    stages = report.get("stages") or {}
    if stages:
        lines += ["", "## Wall time per stage", ""]
        secs = {name: None if sec is None else float(sec) for name, sec in stages.items()}
        secs["**total**"] = sum(s for s in secs.values() if s is not None)
        rows = [[name, fmt_seconds(sec), fmt(sec, 1)] for name, sec in secs.items()]
        lines += _table(["stage", "wall time", "seconds"], rows)
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the plots, ``report.md`` and finally ``report.json`` into ``out_dir``; returns their paths.

    Keys of the result: ``confusion_matrix``, ``accuracy_per_round``, ``reliability`` (each only when
    the report holds its data), ``markdown``, ``json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = jsonable(report)
    # Remove a previous report.json first: while the new files are being written, the folder must not
    # look complete.
    (out / REPORT_JSON).unlink(missing_ok=True)

    paths: dict[str, Path] = {}
    classes = [str(c) for c in data.get("classes") or []]
    test = _test(data)
    confusion = test.get("confusion")
    if confusion:
        names = classes if len(classes) == len(confusion) else [str(i) for i in range(len(confusion))]
        plot_confusion(confusion, names, out / CONFUSION_PNG)
        paths["confusion_matrix"] = out / CONFUSION_PNG
    rounds = data.get("rounds") or []
    if rounds:
        plot_rounds(rounds, data.get("best_round"), out / ROUNDS_PNG)
        paths["accuracy_per_round"] = out / ROUNDS_PNG
    if test.get("reliability"):
        plot_reliability(test["reliability"], test.get("ece"), out / RELIABILITY_PNG)
        paths["reliability"] = out / RELIABILITY_PNG

    # A plot this report has no data for must not survive from an earlier report in the same folder.
    for key, name in PLOTS.items():
        if key not in paths:
            (out / name).unlink(missing_ok=True)

    images = {key: p.name for key, p in paths.items()}
    markdown = render_markdown(data, images)
    write_bytes_atomic(str(out / REPORT_MD), markdown.encode("utf-8"))
    paths["markdown"] = out / REPORT_MD

    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(str(out / REPORT_JSON), text.encode("utf-8"))
    paths["json"] = out / REPORT_JSON
    return paths
