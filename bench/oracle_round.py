"""Diagnostic: retrain round 1 of a finished full run on the same rows, with their TRUE labels.

    python bench/oracle_round.py RUN_DIR --out DIR

RUN_DIR is a finished ``raysemi run`` (mode full, at least one round) on a fully labelled data set whose
labels were hidden by ``data.label_fraction``. The round-1 selection is redone from the run's own predictions
and settings; the selected rows get their hidden true labels instead of the teacher's, and one round is
trained from the run's pretrained weights with the run's config. Comparing its val/test metrics with the run's
round 1 separates what the pseudo-labels' errors cost from what the change of training data does.
Prints and writes ``<out>/oracle.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from raysemi.config import load_config
from raysemi.data.labels import label_split
from raysemi.data.shards import read_manifest
from raysemi.data.trainset import write_trainset
from raysemi.pretrain_cache import cache_key, lookup
from raysemi.stages import finetune
from raysemi.stages.commits import read_predictions
from raysemi.stages.evaluate import split_metrics
from raysemi.stages.selection import budget_count, select_pseudo_labels, selection_prior


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished full run (its config.yaml, predictions/round=1)")
    ap.add_argument("--out", required=True, help="folder for the oracle round")
    args = ap.parse_args(argv)
    run, out = Path(args.run_dir).resolve(), Path(args.out).resolve()
    if not (run / "predictions" / "round=1").is_dir() or not (run / "report.json").is_file():
        raise SystemExit(f"bench/oracle_round.py: error: {run} is not a finished full run with a round 1")
    cfg = load_config(run / "config.yaml", [f"run.output_dir={out}", f"run.name=oracle-{run.name}"])
    manifest, labels = read_manifest(cfg.data.path), label_split(cfg.data.path, cfg.data)
    pl, classes = cfg.pseudolabel, manifest.classes
    chosen = select_pseudo_labels(
        read_predictions(str(run / "predictions" / "round=1")), set(labels.pool_ids),
        budget_count(pl.budget, len(labels.pool_ids)), len(classes),
        prior=selection_prior(pl.selection, labels.labeled_targets, len(classes)), min_confidence=pl.min_confidence)
    ids = chosen.column("id").to_pylist()
    if any(i not in labels.pool_truth for i in ids):
        raise SystemExit("bench/oracle_round.py: error: some selected rows have no hidden true label")
    truth = np.array([labels.pool_truth[i] for i in ids])
    precision = float((np.asarray(chosen.column("pred").to_pylist()) == truth).mean())
    rows = {i: (int(y), 1.0) for i, y in zip(labels.labeled_ids, labels.labeled_targets)}
    rows.update({i: (int(t), cfg.finetune.pseudo_weight) for i, t in zip(ids, truth)})
    entry = lookup(cfg.pretrain.cache, cache_key(cfg)) if cfg.pretrain.cache else None
    init = entry["weights"] if entry is not None else str(run / "pretrain" / "byol.safetensors")
    trainset = write_trainset(cfg.data.path, manifest, rows, str(out / "round=1" / "trainset"), num_shards=4)
    result = finetune.run(cfg, trainset, init, str(out / "round=1"), f"oracle-{run.name}", classes)
    report = json.loads((run / "report.json").read_text())
    got = {"run": str(run), "selected": len(ids), "pseudo_label_precision": precision,
           "pseudo_round1_val": report["rounds"][1]["val"]["accuracy"],
           "round0_val": report["rounds"][0]["val"]["accuracy"]}
    for split in ("val", "test"):
        m = split_metrics(result.weights, cfg, split, classes)
        got[f"oracle_{split}_accuracy"], got[f"oracle_{split}_balanced_accuracy"] = m["accuracy"], m["balanced_accuracy"]
    (out / "oracle.json").write_text(json.dumps(got, indent=2) + "\n")
    print(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
