"""``run_pipeline(cfg)``: pretrain -> fine-tune -> R x (pseudo-label -> retrain) -> evaluate. Sequencing only.

``run.mode`` picks the method or one of its baselines: ``full`` (the method), ``byol_finetune`` (BYOL then
fine-tuning, no pseudo-labels), ``supervised`` (random init, labelled rows only) and ``fixmatch`` (BYOL, then
fine-tuning on the labelled rows with FixMatch's consistency loss on the pool: ``stages/consistency.py``). Round 0 is fine-tuning
on the labelled rows; round r >= 1 retrains on them plus the ``r x budget`` most confident predictions of
the previous round's model (the teacher, on clean eval-transform images) over the unlabelled pool, shared
among classes by ``pseudolabel.selection``, as hard labels or the teacher's probabilities
(``pseudolabel.soft_targets``). Every round trains ``finetune.steps`` steps. The round with the best
validation ``run.select_metric`` is evaluated on test. Everything lands in ``run.output_dir`` (local or
s3://), ``report.json`` last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from raysemi.core.config import Config, config_to_yaml
from raysemi.core.event_log import EventLog, copy_events
from raysemi.core.io import join, write_bytes_atomic
from raysemi.core.outputs import RUN, guard_output, mark
from raysemi.data.labels import label_split
from raysemi.data.shards import DatasetError, Manifest, read_manifest
from raysemi.distributed import ray_tasks, ray_utils
from raysemi.pipeline.rounds import RoundResult, RunState, chosen_round, labeled_trainset, ran_with, run_round
from raysemi.stages import finetune, pool, pretrain
from raysemi.stages.evaluate import publish_report, split_metrics
from raysemi.stages.pseudolabel import predict_shards
from raysemi.stages.selection import budget_count, check_budget, selection_prior

log = logging.getLogger("raysemi.pipeline.run")

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


def run_pipeline(cfg: Config, *, resume: bool = False, overwrite: bool = False, config_path: str = "",
                 on_round: Callable[[RoundResult, bool], None] | None = None) -> str:
    """Run the configured method end to end; returns the URI of ``report.json``.

    ``on_round``, when given, is called after each round with its ``RoundResult`` and whether the pretrained
    weights were reused from the cache (tuning reports them to Ray Tune).
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = check_dataset(cfg)
    labels = label_split(cfg.data.path, cfg.data, manifest, ray_tasks.task_mapper(cfg.ray.address))
    pl = cfg.pseudolabel
    rounds = pl.rounds if cfg.run.mode == "full" else 0
    per_round = budget_count(pl.budget, labels.pool_rows)
    if rounds and pl.budget > 1:  # a count must fit; a fraction is capped at the whole pool
        check_budget(per_round * rounds, labels.pool_rows)
    if cfg.run.mode != "supervised":
        pretrain.check_inputs(cfg)
    prepare_output(cfg, resume, overwrite)

    stages: dict[str, float] = {}
    byol = None
    reused, cache_key = False, None
    compute: dict[str, Any] = {}  # what each stage ran with (precision, layout), from its own metrics
    if cfg.run.mode != "supervised":
        t0 = time.time()
        if cfg.pretrain.cache:
            from raysemi.pipeline.pretrain_cache import pretrain_cached

            cached = pretrain_cached(cfg)
            byol, reused, cache_key = cached.weights, cached.reused, cached.key
            copy_events(cached.weights.rsplit("/", 1)[0], join(cfg.run.output_dir, "pretrain"))
        else:
            done_pretrain = pretrain.run(cfg, resume=resume)
            byol = done_pretrain.weights
            compute["pretrain"] = ran_with(done_pretrain.metrics)
        stages["pretrain"] = time.time() - t0

    state = RunState(manifest, labels, labeled_trainset(cfg, manifest, labels, join(cfg.run.output_dir, "round=0"),
                                                        resume), byol, per_round)
    history: list[RoundResult] = []
    for r in range(rounds + 1):
        result = run_round(cfg, r, state, history[-1].model if history else None, resume)
        history.append(result)
        stages["finetune" if r == 0 else f"round_{r}"] = result.seconds
        log.info("round %d: val accuracy %.4f, balanced %.4f (%d pseudo-labels%s, %d steps)", r,
                 result.val["accuracy"], result.val["balanced_accuracy"], result.n_pseudo,
                 "" if result.pseudo_precision is None else f", precision {result.pseudo_precision:.3f}",
                 result.steps)
        # The per-round summary, beside the stages' own curves.
        with EventLog(cfg.run.output_dir, suffix=f".round{r}") as events:
            events.log(r, {**{f"val_{k}": v for k, v in result.val.items()}, "n_pseudo": result.n_pseudo,
                           "pseudo_precision": result.pseudo_precision, "steps": result.steps}, "rounds/")
        if on_round is not None:
            on_round(result, reused)

    best = chosen_round(history, cfg.run.select_metric)
    t0 = time.time()
    test = split_metrics(best.model, cfg, "test", manifest.classes)
    stages["evaluate"] = time.time() - t0
    report = {
        "run": {
            "name": cfg.run.name, "mode": cfg.run.mode, "head": cfg.model.head, "dataset": cfg.data.path,
            "output_dir": cfg.run.output_dir,
            "config_path": config_path, "started": started, "backbone": cfg.model.backbone,
            "best_model": best.model, "label_fraction": cfg.data.label_fraction,
            "select_metric": cfg.run.select_metric, "finetune_steps": cfg.finetune.steps,
            "selection": cfg.pseudolabel.selection, "soft_targets": cfg.pseudolabel.soft_targets,
            "labels_per_class": cfg.data.labels_per_class,
            "pretrain_reused": reused, "pretrain_cache_key": cache_key,
        },
        "classes": manifest.classes,
        "data": {
            "n_train_labeled": labels.n_labeled, "n_unlabeled": labels.pool_rows,
            "n_val": manifest.splits["val"].rows, "n_test": manifest.splits["test"].rows,
        },
        "stages": stages,
        "compute": {**compute, "finetune": history[0].compute},
        "rounds": [h.to_dict() for h in history],
        "best_round": best.round,
        "test": test,
    }
    return publish_report(report, cfg.run.output_dir)


def finetune_only(cfg: Config, init: str | None, overwrite: bool = False) -> str:
    """``raysemi finetune``: round 0 alone (the labelled rows), from ``init`` or random weights."""
    manifest = check_dataset(cfg)
    labels = label_split(cfg.data.path, cfg.data, manifest, ray_tasks.task_mapper(cfg.ray.address))
    finetune.check_init(cfg, manifest.num_classes, init)
    out = join(cfg.run.output_dir, "finetune")
    guard_output(out, "a classifier", join(out, finetune.WEIGHTS), overwrite=overwrite)
    if overwrite:
        ray_utils.remove_train_run(f"{cfg.run.name}-finetune", cfg)
    trainset = labeled_trainset(cfg.replace(**{"pseudolabel.soft_targets": False}), manifest, labels, out)
    return finetune.run(cfg, trainset, init, out, f"{cfg.run.name}-finetune", manifest.classes).weights


def pseudolabel_only(cfg: Config, model: str, out: str | None = None) -> str:
    """``raysemi pseudolabel``: predictions for the whole pool, then the top-``budget`` selection, written
    as ``selected/part-NNNNN.parquet`` (``id, pred, confidence``) by Ray tasks, one per group of shards."""
    manifest = read_manifest(cfg.data.path)
    labels = label_split(cfg.data.path, cfg.data, manifest, ray_tasks.task_mapper(cfg.ray.address))
    budget = budget_count(cfg.pseudolabel.budget, labels.pool_rows)
    check_budget(budget, labels.pool_rows)
    out = out or join(cfg.run.output_dir, "predictions/manual")
    shards = pool.pool_shards(cfg.data.path, manifest, out)
    result = predict_shards(model, [s.uri for s in shards], out, cfg, input_rows=[s.rows for s in shards],
                            input_sha256=[h for sp in pool.POOL_SPLITS for h in manifest.shard_hashes(sp)])
    pl = cfg.pseudolabel
    view = pool.PoolView(labels.rule, manifest.num_classes, pl.min_confidence)
    tasks = ray_tasks.task_mapper(cfg.ray.address)
    rule, _ = pool.select(shards, view, budget, selection_prior(pl.selection, labels.labeled_counts), tasks)
    chosen = pool.write_selected(shards, view, rule, join(out, "selected"), tasks)
    return (f"{result.rows} predictions in {out} ({result.shards_computed} shards computed, "
            f"{result.shards_skipped} reused); {chosen} selected -> {join(out, 'selected')}")
