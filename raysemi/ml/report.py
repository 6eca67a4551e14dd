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
      "compute": {"pretrain": C, "finetune": C},  # C = {"device", "precision" (as run: fp32 | bf16 | fp16),
                                                  #      "channels_last", "cpu_bf16_units"} or None
      "rounds": [                                  # round 0 = fine-tuning on the labeled set only
        {"round": 0, "val": <classification_metrics dict> | None, "n_pseudo": 0,
         "pseudo_precision": float | None, "train_rows": int, "steps": int, "images_seen": int,
         "seconds": float},
        {"round": 1, ...},
      ],
      "best_round": int,                           # the round whose model is evaluated on test
      "test": <classification_metrics dict>,       # raysemi.ml.metrics.classification_metrics
    }

Files: ``confusion_matrix.png`` (test confusion, counts), ``accuracy_per_round.png`` (val accuracy and
pseudo-label precision per round), ``reliability.png`` (test reliability diagram), ``report.md``, and
``report.json`` last: an existing ``report.json`` is removed first and written again only after every
other file is in place, so its presence means the report is complete.

Local folders only (written atomically through ``raysemi.core.io``); to publish to ``s3://``, write locally and copy.
Plots (``raysemi.ml.report_plots``) use matplotlib's object API on an Agg canvas, never pyplot, so no global backend or figure state
is touched and the function is safe in Ray workers and threads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from raysemi.core.io import write_bytes_atomic
from raysemi.core.tables import NA, fmt, markdown_table
from raysemi.ml.report_plots import plot_confusion, plot_reliability, plot_rounds

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


def _test(report: Mapping[str, Any]) -> Mapping[str, Any]:
    return report.get("test") or {}


# --- Markdown -------------------------------------------------------------------------------------



def metric(value: Any) -> str:
    """A metric as the report shows it: 4 decimals (``tables.fmt``)."""
    return fmt(value, 4)


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
    for stage, c in (report.get("compute") or {}).items():
        if c:
            lines.append(f"- **{stage} ran as**: {c['precision']} on {c['device']}"
                         f"{', channels_last' if c['channels_last'] else ''}")

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
                    metric(r.get("train_rows")),
                    metric(r.get("n_pseudo")),
                    metric(r.get("pseudo_precision")),
                    metric(r.get("steps")),
                    metric(r.get("images_seen")),
                    metric(val.get("accuracy")),
                    metric(val.get("balanced_accuracy")),
                    metric(val.get("macro_f1")),
                ]
            )
        lines += markdown_table(
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
        auc = metric(test.get("auc_ovr"))
        if test.get("auc_ovr") is None and test.get("auc_note"):
            auc = f"{NA} ({test['auc_note']})"
        lines += markdown_table(
            ["metric", "value"],
            [
                ["samples", metric(test.get("n"))],
                ["accuracy", metric(test.get("accuracy"))],
                ["balanced accuracy", metric(test.get("balanced_accuracy"))],
                ["macro-F1", metric(test.get("macro_f1"))],
                ["ROC AUC (macro one-vs-rest)", auc],
                ["ECE (15 bins)", metric(test.get("ece"))],
            ],
        )
        per_class = test.get("per_class") or {}
        if per_class:
            lines += ["", "### Per class (test)", ""]
            lines += markdown_table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    [
                        name,
                        metric(m.get("precision")),
                        metric(m.get("recall")),
                        metric(m.get("f1")),
                        metric(m.get("support")),
                    ]
                    for name, m in per_class.items()
                ],
            )
        confusion = test.get("confusion")
        if confusion:
            names = classes if len(classes) == len(confusion) else [str(i) for i in range(len(confusion))]
            lines += ["", "### Confusion matrix (test; rows = true, columns = predicted)", ""]
            lines += markdown_table(
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

    if rounds:
        lines += ["", "## Curves", "",
                  "Every stage wrote its metrics as TensorBoard events in its own folder (`pretrain/`, `round=N/`) "
                  "and the round summary (`rounds/...`) in this one: `pip install tensorboard`, then "
                  "`tensorboard --logdir " + str(run.get("output_dir") or "<this folder>") + "`."]

    stages = report.get("stages") or {}
    if stages:
        lines += ["", "## Wall time per stage", ""]
        secs = {name: None if sec is None else float(sec) for name, sec in stages.items()}
        secs["**total**"] = sum(s for s in secs.values() if s is not None)
        rows = [[name, fmt_seconds(sec), fmt(sec, 1)] for name, sec in secs.items()]
        lines += markdown_table(["stage", "wall time", "seconds"], rows)
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
