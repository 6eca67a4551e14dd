"""``run_pipeline(cfg)``: pretrain -> fine-tune -> R x (pseudo-label -> retrain) -> evaluate. Sequencing only.

``run.mode`` picks the method or one of its baselines: ``full`` (the method), ``byol_finetune`` (BYOL then
fine-tuning, no pseudo-labels) and ``supervised`` (random init, labelled rows only). Round 0 is fine-tuning
on the labelled rows; round r >= 1 retrains on them plus the ``r x budget`` most confident predictions of
the previous round's model (the teacher, on clean eval-transform images) over the unlabelled pool, shared
among classes by ``pseudolabel.selection``, as hard labels or the teacher's probabilities
(``pseudolabel.soft_targets``). Every round trains ``finetune.steps`` steps. The round with the best
validation ``run.select_metric`` is evaluated on test. Everything lands in ``run.output_dir`` (local or
s3://), ``report.json`` last.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from raysemi import io as rio
from raysemi import ray_utils
from raysemi.config import Config, config_to_yaml
from raysemi.data.labels import label_split
from raysemi.data.shards import DatasetError, Manifest, read_manifest, table_bytes
from raysemi.data.trainset import write_trainset
from raysemi.event_log import EventLog, copy_events
from raysemi.io import filesystem, join, write_bytes_atomic
from raysemi.losses import sharpen
from raysemi.metrics import pseudo_label_precision
from raysemi.outputs import RUN, guard_output, mark
from raysemi.stages import finetune, pretrain
from raysemi.stages.commits import read_predictions
from raysemi.stages.evaluate import publish_report, split_metrics
from raysemi.stages.pseudolabel import predict_shards
from raysemi.stages.selection import budget_count, check_budget, select_pseudo_labels, selection_prior

log = logging.getLogger("raysemi.pipeline")

CONFIG = "config.yaml"


def check_dataset(cfg: Config) -> Manifest:
    manifest = read_manifest(cfg.data.path)
    if not any(s.labeled for s in manifest.splits.values()):
        raise DatasetError(
            f"dataset {cfg.data.path} has no labelled rows: the method needs some. Ingest labels with the images, "
            "as class subfolders (<source>/<class>/*.png) or a CSV with a 'label' column (--labels for DICOM)"
        )
    for split in ("train", "val", "test"):
        if split not in manifest.splits or manifest.splits[split].rows == 0:
            raise DatasetError(f"dataset {cfg.data.path} has no {split!r} split (re-ingest with val/test fractions)")
    for split in ("val", "test"):
        if manifest.splits[split].labeled == 0:
            raise DatasetError(f"the {split!r} split of {cfg.data.path} has no labels")
    return manifest


def prepare_output(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds an earlier run unless told to resume it or start afresh."""
    out = cfg.run.output_dir
    guard_output(out, "an earlier run", join(out, CONFIG), resume=resume, overwrite=overwrite, layout=RUN)
    mark(out, RUN)
    write_bytes_atomic(join(cfg.run.output_dir, CONFIG), config_to_yaml(cfg).encode())


def _train_round(cfg: Config, manifest: Manifest, rows: dict[str, tuple[int, float]], r: int,
                 init: str | None, resume: bool, targets: dict[str, list[float]] | None = None,
                 repeats: dict[str, int] | None = None) -> finetune.FinetuneResult:
    out = join(cfg.run.output_dir, f"round={r}")
    weights = join(out, finetune.WEIGHTS)
    fs, path = filesystem(weights)
    if resume and fs.exists(path):
        log.info("round %d: reusing %s", r, weights)
        _, meta = rio.load_weights(weights)
        extra = json.loads(meta.get("extra", "{}"))
        return finetune.FinetuneResult(weights, rio.file_sha256(weights), [], 0.0,
                                       int(extra.get("steps", 0)), int(extra.get("images_seen", 0)))
    trainset = write_trainset(cfg.data.path, manifest, rows, join(out, "trainset"),
                              num_shards=max(2 * cfg.ray.num_workers, 4), targets=targets, repeats=repeats)
    return finetune.run(cfg, trainset, init, out, f"{cfg.run.name}-round{r}", manifest.classes, f"round {r}")


def labeled_repeats(n_labeled: int, n_pseudo: int, share: float) -> int:
    """How many copies of each true label make them ``share`` of a round's rows (at least one): with
    equal steps per round, more pseudo-labels would otherwise mean fewer passes over the true labels."""
    if share <= 0 or n_pseudo == 0 or n_labeled == 0:
        return 1
    return max(1, round(share / (1.0 - share) * n_pseudo / n_labeled))


def best_round(history: list[dict[str, Any]], metric: str) -> int:
    """The round with the highest validation ``metric``; the earliest one on a tie (fewer pseudo-labels)."""
    return max(range(len(history)), key=lambda i: (history[i]["val"][metric], -i))


def soft_targets(probs: list[list[float]], temperature: float) -> list[list[float]]:
    """The teacher's probabilities at ``temperature`` (``pseudolabel.soft_targets``)."""
    return sharpen(torch.tensor(probs, dtype=torch.float64), temperature).tolist()


def run_pipeline(cfg: Config, *, resume: bool = False, overwrite: bool = False, config_path: str = "",
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Run the configured method end to end; returns the URI of ``report.json``.

    ``on_round``, when given, is called after each round with ``{"round", "val_accuracy", "val_macro_f1",
    "n_pseudo", "pseudo_precision", "seconds", "pretrain_reused"}`` (tuning reports it to Ray Tune).
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = check_dataset(cfg)
    labels = label_split(cfg.data.path, cfg.data)
    pl = cfg.pseudolabel
    rounds = pl.rounds if cfg.run.mode == "full" else 0
    per_round = budget_count(pl.budget, len(labels.pool_ids))
    if rounds and pl.budget > 1:  # a count must fit; a fraction is capped at the whole pool
        check_budget(per_round * rounds, len(labels.pool_ids))
    if cfg.run.mode != "supervised":
        pretrain.check_inputs(cfg)
    prepare_output(cfg, resume, overwrite)

    stages: dict[str, float] = {}
    byol = None
    reused, cache_key = False, None
    if cfg.run.mode != "supervised":
        t0 = time.time()
        if cfg.pretrain.cache:
            from raysemi.pretrain_cache import pretrain_cached

            cached = pretrain_cached(cfg)
            byol, reused, cache_key = cached.weights, cached.reused, cached.key
            copy_events(cached.weights.rsplit("/", 1)[0], join(cfg.run.output_dir, "pretrain"))
        else:
            byol = pretrain.run(cfg, resume=resume).weights
        stages["pretrain"] = time.time() - t0

    classes = manifest.classes
    labeled = {i: (int(y), 1.0) for i, y in zip(labels.labeled_ids, labels.labeled_targets)}
    history: list[dict[str, Any]] = []
    models: list[str] = []
    pool_uris = [u for s in ("train", "unlabeled") if s in manifest.splits
                 for u in manifest.shard_uris(cfg.data.path, s)]
    pool_hashes = [h for s in ("train", "unlabeled") for h in manifest.shard_hashes(s)]
    pool = set(labels.pool_ids)
    prior = selection_prior(pl.selection, labels.labeled_targets, len(classes))

    for r in range(rounds + 1):
        t0 = time.time()
        rows, n_pseudo, precision, targets = dict(labeled), 0, None, None
        if r > 0:
            pred_uri = join(cfg.run.output_dir, f"predictions/round={r}")
            predict_shards(models[-1], pool_uris, pred_uri, cfg, input_sha256=pool_hashes)
            predictions = read_predictions(pred_uri)
            chosen = select_pseudo_labels(predictions, pool, min(per_round * r, len(pool)), len(classes),
                                          prior=prior, min_confidence=pl.min_confidence)
            ids = chosen.column("id").to_pylist()
            preds = np.asarray(chosen.column("pred").to_pylist(), dtype=np.int64)
            rows.update({i: (int(p), cfg.finetune.pseudo_weight) for i, p in zip(ids, preds)})
            if pl.soft_targets:
                by_id = dict(zip(predictions.column("id").to_pylist(), predictions.column("probs").to_pylist()))
                targets = dict(zip(ids, soft_targets([by_id[i] for i in ids], pl.temperature)))
            truth = np.array([labels.pool_truth.get(i, -1) for i in ids], dtype=np.int64)
            precision = pseudo_label_precision(truth, preds, classes)
            n_pseudo = len(ids)
        init = byol
        if r > 0 and pl.retrain_from == "previous":
            init = models[-1]
        copies = labeled_repeats(len(labeled), n_pseudo, pl.labeled_share)
        repeats = {i: copies for i in labeled} if copies > 1 else None
        round_cfg = cfg
        if r > 0 and pl.retrain_lr_scale != 1.0:
            round_cfg = cfg.replace(**{"finetune.lr": cfg.finetune.lr * pl.retrain_lr_scale})
        result = _train_round(round_cfg, manifest, rows, r, init, resume, targets, repeats)
        models.append(result.weights)
        val = split_metrics(result.weights, cfg, "val", classes)
        history.append({
            "round": r, "val": val, "n_pseudo": n_pseudo, "train_rows": len(rows),
            "steps": result.steps, "images_seen": result.images_seen, "labeled_copies": copies,
            "pseudo_precision": precision["precision"] if precision else None,
            "pseudo_detail": precision, "seconds": time.time() - t0, "model": result.weights,
        })
        stages["finetune" if r == 0 else f"round_{r}"] = time.time() - t0
        log.info("round %d: val accuracy %.4f, balanced %.4f (%d pseudo-labels%s, %d steps)", r,
                 val["accuracy"], val["balanced_accuracy"], n_pseudo,
                 "" if precision is None else f", precision {precision['precision']:.3f}", result.steps)
        # The per-round summary, beside the stages' own curves.
        with EventLog(cfg.run.output_dir, suffix=f".round{r}") as events:
            events.log(r, {**{f"val_{k}": v for k, v in val.items()}, "n_pseudo": n_pseudo,
                           "pseudo_precision": history[-1]["pseudo_precision"], "steps": result.steps}, "rounds/")
        if on_round is not None:
            on_round({"round": r, "val_accuracy": val["accuracy"], "val_macro_f1": val.get("macro_f1"),
                      "val_balanced_accuracy": val.get("balanced_accuracy"),
                      "val_selected": val[cfg.run.select_metric],
                      "n_pseudo": n_pseudo, "pseudo_precision": history[-1]["pseudo_precision"],
                      "seconds": history[-1]["seconds"], "pretrain_reused": reused})

    best = best_round(history, cfg.run.select_metric)
    t0 = time.time()
    test = split_metrics(models[best], cfg, "test", classes)
    stages["evaluate"] = time.time() - t0
    report = {
        "run": {
            "name": cfg.run.name, "mode": cfg.run.mode, "head": cfg.model.head, "dataset": cfg.data.path,
            "output_dir": cfg.run.output_dir,
            "config_path": config_path, "started": started, "backbone": cfg.model.backbone,
            "best_model": models[best], "label_fraction": cfg.data.label_fraction,
            "select_metric": cfg.run.select_metric, "finetune_steps": cfg.finetune.steps,
            "selection": cfg.pseudolabel.selection, "soft_targets": cfg.pseudolabel.soft_targets,
            "labels_per_class": cfg.data.labels_per_class,
            "pretrain_reused": reused, "pretrain_cache_key": cache_key,
        },
        "classes": classes,
        "data": {
            "n_train_labeled": len(labeled), "n_unlabeled": len(labels.pool_ids),
            "n_val": manifest.splits["val"].rows, "n_test": manifest.splits["test"].rows,
        },
        "stages": stages,
        "rounds": history,
        "best_round": best,
        "test": test,
    }
    return publish_report(report, cfg.run.output_dir)


def finetune_only(cfg: Config, init: str | None, overwrite: bool = False) -> str:
    """``raysemi finetune``: round 0 alone (the labelled rows), from ``init`` or random weights."""
    manifest = check_dataset(cfg)
    labels = label_split(cfg.data.path, cfg.data)
    finetune.check_init(cfg, manifest.num_classes, init)
    out = join(cfg.run.output_dir, "finetune")
    guard_output(out, "a classifier", join(out, finetune.WEIGHTS), overwrite=overwrite)
    if overwrite:
        ray_utils.remove_train_run(f"{cfg.run.name}-finetune", cfg)
    rows = {i: (int(y), 1.0) for i, y in zip(labels.labeled_ids, labels.labeled_targets)}
    trainset = write_trainset(cfg.data.path, manifest, rows, join(out, "trainset"),
                              num_shards=max(2 * cfg.ray.num_workers, 4))
    return finetune.run(cfg, trainset, init, out, f"{cfg.run.name}-finetune", manifest.classes).weights


def pseudolabel_only(cfg: Config, model: str, out: str | None = None) -> str:
    """``raysemi pseudolabel``: predictions for the whole pool, then the top-``budget`` selection."""
    manifest = read_manifest(cfg.data.path)
    labels = label_split(cfg.data.path, cfg.data)
    budget = budget_count(cfg.pseudolabel.budget, len(labels.pool_ids))
    check_budget(budget, len(labels.pool_ids))
    out = out or join(cfg.run.output_dir, "predictions/manual")
    uris = [u for s in ("train", "unlabeled") if s in manifest.splits for u in manifest.shard_uris(cfg.data.path, s)]
    hashes = [h for s in ("train", "unlabeled") for h in manifest.shard_hashes(s)]
    result = predict_shards(model, uris, out, cfg, input_sha256=hashes)
    pl = cfg.pseudolabel
    chosen = select_pseudo_labels(read_predictions(out), set(labels.pool_ids), budget, manifest.num_classes,
                                  prior=selection_prior(pl.selection, labels.labeled_targets, manifest.num_classes),
                                  min_confidence=pl.min_confidence)
    write_bytes_atomic(join(out, "selected.parquet"), table_bytes(chosen))
    return (f"{result.rows} predictions in {out} ({result.shards_computed} shards computed, "
            f"{result.shards_skipped} reused); {chosen.num_rows} selected -> {join(out, 'selected.parquet')}")
