"""Report files: all present, valid PNGs, JSON round trip, Markdown values, atomic and ordered writes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from raysemi.core.tables import fmt
from raysemi.ml import report as report_mod
from raysemi.ml import report_plots
from raysemi.ml.metrics import classification_metrics
from raysemi.ml.report import fmt_seconds, metric, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def _metrics(n: int, seed: int, boost: float) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), size=n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += boost
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return classification_metrics(y, probs, CLASSES)


@pytest.fixture
def full_report() -> dict:
    """What the pipeline produces after fine-tuning plus 2 pseudo-labeling rounds."""
    return {
        "run": {
            "name": "covid19-demo",
            "mode": "full",
            "head": "projector",
            "dataset": "covid19-radiography-3class",
            "config_path": "configs/covid19.yaml",
            "started": "2025-01-01T12:00:00+00:00",
            "backbone": "resnet18",
        },
        "classes": CLASSES,
        "data": {"n_train_labeled": 300, "n_unlabeled": 5000, "n_val": 200, "n_test": 400},
        "stages": {"pretrain": 3725.4, "finetune": 130.0, "round_1": 250.5, "round_2": 260.25, "evaluate": 12.0},
        "rounds": [
            {"round": 0, "val": _metrics(200, 1, 1.5), "n_pseudo": 0, "pseudo_precision": None,
             "train_rows": 300, "seconds": 130.0},
            {"round": 1, "val": _metrics(200, 2, 2.5), "n_pseudo": 500, "pseudo_precision": 0.912,
             "train_rows": 800, "steps": 600, "images_seen": 38400, "seconds": 250.5},
            {"round": 2, "val": _metrics(200, 3, 2.0), "n_pseudo": 1000, "pseudo_precision": 0.874,
             "train_rows": 1800, "seconds": 260.25},
        ],
        "best_round": 1,
        "test": _metrics(400, 4, 2.5),
    }  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_writes_all_files(tmp_path, full_report):
    out = tmp_path / "report"  # does not exist yet: created
    paths = write_report(full_report, out)
    assert set(paths) == {"confusion_matrix", "accuracy_per_round", "reliability", "markdown", "json"}
    expected = [
        "confusion_matrix.png",
        "accuracy_per_round.png",
        "reliability.png",
        "report.md",
        "report.json",
    ]
    assert sorted(p.name for p in paths.values()) == sorted(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # and no temporary files left
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in paths.values())
    for key in ("confusion_matrix", "accuracy_per_round", "reliability"):
        width, height = _png_size(paths[key])
        assert width > 300 and height > 300  # a real figure, not an empty canvas
        assert paths[key].stat().st_size > 10_000  # text, axes and cells drawn into it


def test_json_round_trips(tmp_path, full_report):
    paths = write_report(full_report, tmp_path)
    assert json.loads(paths["json"].read_text()) == full_report


def test_markdown_holds_the_values(tmp_path, full_report):
    md = write_report(full_report, tmp_path)["markdown"].read_text()
    test = full_report["test"]
    assert md.startswith("# raysemi report: covid19-demo\n")
    assert "- **mode**: full" in md and "- **head**: projector" in md and "- **backbone**: resnet18" in md
    # Per-round table: round, train rows, pseudo-labels added, pseudo-label precision, optimizer steps, images
    # seen, val acc, val balanced acc, val F1.
    r1 = full_report["rounds"][1]["val"]
    assert (f"| 1 (best) | 800 | 500 | 0.9120 | 600 | 38400 | {r1['accuracy']:.4f} | "
            f"{r1['balanced_accuracy']:.4f} | {r1['macro_f1']:.4f} |") in md
    r0 = full_report["rounds"][0]["val"]
    # A report from before steps were counted shows n/a there.
    assert (f"| 0 | 300 | 0 | n/a | n/a | n/a | {r0['accuracy']:.4f} | {r0['balanced_accuracy']:.4f} | "
            f"{r0['macro_f1']:.4f} |") in md
    assert "## Test metrics (model of round 1)" in md
    assert f"| accuracy | {test['accuracy']:.4f} |" in md
    assert f"| balanced accuracy | {test['balanced_accuracy']:.4f} |" in md
    assert f"| macro-F1 | {test['macro_f1']:.4f} |" in md
    assert f"| ROC AUC (macro one-vs-rest) | {test['auc_ovr']:.4f} |" in md
    assert f"| ECE (15 bins) | {test['ece']:.4f} |" in md
    pc = test["per_class"]["Viral Pneumonia"]
    assert (
        f"| Viral Pneumonia | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} | {pc['support']} |"
        in md
    )
    assert "| true \\ predicted | COVID | Normal | Viral Pneumonia |" in md
    row = test["confusion"][0]
    assert f"| COVID | {row[0]} | {row[1]} | {row[2]} |" in md
    for png in ("confusion_matrix.png", "accuracy_per_round.png", "reliability.png"):
        assert f"]({png})" in md
    assert "| pretrain | 1h 02m 05s | 3725.4 |" in md
    assert "| evaluate | 12.0s | 12.0 |" in md
    assert "| **total** | 1h 12m 58s | 4378.1 |" in md


def test_report_json_is_written_last(tmp_path, full_report, monkeypatch):
    order = []
    real_write = report_mod.write_bytes_atomic

    def recording_write(uri, data):
        order.append(Path(uri).name)
        real_write(uri, data)

    monkeypatch.setattr(report_mod, "write_bytes_atomic", recording_write)
    monkeypatch.setattr(report_plots, "write_bytes_atomic", recording_write)  # the PNGs
    write_report(full_report, tmp_path)
    assert order[-1] == "report.json"
    assert len(order) == 5


def test_failed_write_leaves_no_report_json(tmp_path, full_report, monkeypatch):
    write_report(full_report, tmp_path)  # a previous, complete report
    assert (tmp_path / "report.json").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_mod, "plot_reliability", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(full_report, tmp_path)
    # The old report.json is gone: the folder no longer claims a complete report.
    assert not (tmp_path / "report.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_tolerates_missing_parts(tmp_path, full_report):
    write_report(full_report, tmp_path)  # an earlier, full report in the same folder
    paths = write_report({"run": {"name": "bare"}}, tmp_path)
    assert set(paths) == {"markdown", "json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no stale plots
    assert json.loads(paths["json"].read_text()) == {"run": {"name": "bare"}}
    assert paths["markdown"].read_text().startswith("# raysemi report: bare")

    rounds = [{"round": 0, "val": None, "n_pseudo": 0, "pseudo_precision": None, "train_rows": 10}]
    paths = write_report({"rounds": rounds, "best_round": None, "test": None}, tmp_path / "b")
    assert set(paths) == {"accuracy_per_round", "markdown", "json"}
    assert "| 0 | 10 | 0 | n/a | n/a | n/a |" in paths["markdown"].read_text()


def test_numpy_and_nan_values_become_plain_json(tmp_path, full_report):
    full_report["test"]["accuracy"] = np.float32(0.5)
    full_report["test"]["ece"] = float("nan")
    full_report["data"]["n_test"] = np.int64(400)
    full_report["rounds"][1]["pseudo_precision"] = np.float64(0.25)
    paths = write_report(full_report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["test"]["accuracy"] == 0.5 and data["test"]["ece"] is None
    assert data["data"]["n_test"] == 400 and data["rounds"][1]["pseudo_precision"] == 0.25
    md = paths["markdown"].read_text()
    assert "| ECE (15 bins) | n/a |" in md and "| accuracy | 0.5000 |" in md


def test_auc_note_and_pipe_in_names():
    test = {
        "accuracy": 0.9,
        "auc_ovr": None,
        "auc_note": "ROC AUC undefined: no true examples of class(es) b",
    }
    md = render_markdown({"classes": ["a|x", "b"], "test": {**test, "confusion": [[1, 0], [0, 0]]}})
    assert "| ROC AUC (macro one-vs-rest) | n/a (ROC AUC undefined: no true examples of class(es) b) |" in md
    assert "| a\\|x | 1 | 0 |" in md  # a "|" in a class name does not break the table


def test_formatting():
    assert metric(0.96612) == "0.9661" and metric(3) == "3" and metric(None) == "n/a" and metric(float("inf")) == "n/a"
    assert fmt(0.96612) == "0.9661" and fmt(12.34) == "12.3" and fmt(True) == "yes" and fmt(float("nan")) == "n/a"
    assert fmt_seconds(4.24) == "4.2s" and fmt_seconds(123) == "2m 03s" and fmt_seconds(3723) == "1h 02m 03s"
