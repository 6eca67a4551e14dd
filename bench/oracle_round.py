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
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from raysemi.core.config import load_config
from raysemi.data.labels import label_split
from raysemi.data.shards import read_manifest
from raysemi.data.trainset import SourceShard, count_rows, write_trainset
from raysemi.distributed import ray_tasks
from raysemi.pipeline.pretrain_cache import cache_key, lookup
from raysemi.pipeline.rounds import labeled_trainset
from raysemi.stages import finetune, pool
from raysemi.stages.evaluate import split_metrics
from raysemi.stages.selection import budget_count, selection_prior


@dataclass(frozen=True)
class OracleRows(pool.PseudoRows):
    """The round's chosen rows with their hidden true label instead of the teacher's."""

    def chosen_rows(self, shard: SourceShard) -> pa.Table:
        rows = super().chosen_rows(shard)
        if rows.num_rows and pc.min(rows.column("truth")).as_py() < 0:
            raise SystemExit("bench/oracle_round.py: error: some selected rows have no hidden true label")
        return rows.set_column(rows.column_names.index("label"), "label", rows.column("truth"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished full run (its config.yaml, predictions/round=1)")
    ap.add_argument("--out", required=True, help="folder for the oracle round")
    args = ap.parse_args(argv)
    run, out = Path(args.run_dir).resolve(), Path(args.out).resolve()
    if not (run / "predictions" / "round=1").is_dir() or not (run / "report.json").is_file():
        raise SystemExit(f"bench/oracle_round.py: error: {run} is not a finished full run with a round 1")
    cfg = load_config(run / "config.yaml", [f"run.output_dir={out}", f"run.name=oracle-{run.name}"])
    manifest = read_manifest(cfg.data.path)
    tasks = ray_tasks.task_mapper(cfg.ray.address)
    labels = label_split(cfg.data.path, cfg.data, manifest, tasks)
    pl, classes = cfg.pseudolabel, manifest.classes
    shards = pool.pool_shards(cfg.data.path, manifest, str(run / "predictions" / "round=1"))
    view = pool.PoolView(labels.rule, len(classes), pl.min_confidence)
    rule, _ = pool.select(shards, view, budget_count(pl.budget, labels.pool_rows),
                          selection_prior(pl.selection, labels.labeled_counts), tasks)
    teacher = count_rows(pool.PseudoRows(view, rule, cfg.finetune.pseudo_weight), shards, tasks)
    n_selected = sum(teacher[0])
    precision = pool.precision(teacher[2], classes)["precision"]
    source = OracleRows(view, rule, cfg.finetune.pseudo_weight)
    oracle = write_trainset(source, shards, str(out / "round=1" / "trainset"), 4, tasks)
    trainset = labeled_trainset(cfg, manifest, labels, str(out / "round=0")).plus(oracle)
    entry = lookup(cfg.pretrain.cache, cache_key(cfg)) if cfg.pretrain.cache else None
    init = entry["weights"] if entry is not None else str(run / "pretrain" / "byol.safetensors")
    result = finetune.run(cfg, trainset, init, str(out / "round=1"), f"oracle-{run.name}", classes)
    report = json.loads((run / "report.json").read_text())
    got = {"run": str(run), "selected": n_selected, "pseudo_label_precision": precision,
           "pseudo_round1_val": report["rounds"][1]["val"]["accuracy"],
           "round0_val": report["rounds"][0]["val"]["accuracy"]}
    for split in ("val", "test"):
        m = split_metrics(result.weights, cfg, split, classes)
        got[f"oracle_{split}_accuracy"], got[f"oracle_{split}_balanced_accuracy"] = m["accuracy"], m["balanced_accuracy"]
    (out / "oracle.json").write_text(json.dumps(got, indent=2) + "\n")
    print(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
