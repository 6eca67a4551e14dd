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

from raysemi.core import io as rio
from raysemi.core.config import Config, config_to_yaml
from raysemi.core.event_log import EventLog, copy_events
from raysemi.core.io import filesystem, join, write_bytes_atomic
from raysemi.core.outputs import RUN, guard_output, mark
from raysemi.data.labels import LabelSplit, label_split
from raysemi.data.shards import DatasetError, Manifest, read_manifest
from raysemi.data.trainset import LabeledRows, TrainSet, count_rows, read_trainset, write_trainset
from raysemi.distributed import ray_tasks, ray_utils
from raysemi.ml.metrics import best_round
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


def min_parts(cfg: Config) -> int:
    """Parts of a training set: two per worker at least (a multiple of the workers: equal rows per rank)."""
    return max(2 * cfg.ray.num_workers, 4)


def labeled_trainset(cfg: Config, manifest: Manifest, labels: LabelSplit, out: str, resume: bool = False
                     ) -> TrainSet:
    """The chosen labels as a training set under ``<out>/trainset``, written once per run (round 0's; with
    ``resume``, one an interrupted run completed there is reused). With soft targets the parts hold one-hot
    targets too."""
    uri = join(out, "trainset")
    done = read_trainset(uri) if resume else None
    if done is not None:
        return done
    soft = cfg.pseudolabel.soft_targets
    shards = [s for s in pool.pool_shards(cfg.data.path, manifest) if s.split == "train"]
    ts = write_trainset(LabeledRows(labels.rule, manifest.num_classes, soft), shards, uri, min_parts(cfg),
                        ray_tasks.task_mapper(cfg.ray.address))
    return TrainSet(ts.uris, ts.rows, ts.class_counts, soft=False)  # round 0 trains on hard labels


def pseudo_trainset(cfg: Config, manifest: Manifest, labels: LabelSplit, model: str, budget: int, out: str,
                    pred_uri: str, write: bool = True) -> tuple[TrainSet, int, dict | None]:
    """Round r's pseudo-labels: the pool predicted by ``model`` (the actor pool), ``budget`` of them chosen and
    written under ``<out>/trainset`` by Ray tasks (``write``: not when the round is already trained); returns
    the set, its rows and the pseudo-label precision."""
    pl, k = cfg.pseudolabel, manifest.num_classes
    shards = pool.pool_shards(cfg.data.path, manifest, pred_uri)
    predict_shards(model, [s.uri for s in shards], pred_uri, cfg, input_rows=[s.rows for s in shards],
                   input_sha256=[h for sp in pool.POOL_SPLITS for h in manifest.shard_hashes(sp)])
    view = pool.PoolView(labels.rule, k, pl.min_confidence)
    prior = selection_prior(pl.selection, labels.labeled_counts)
    tasks = ray_tasks.task_mapper(cfg.ray.address)
    rule, candidates = pool.select(shards, view, budget, prior, tasks)
    source = pool.PseudoRows(view, rule, cfg.finetune.pseudo_weight, pl.temperature if pl.soft_targets else None)
    counted = count_rows(source, shards, tasks)
    n = sum(counted[0])
    if n < budget:
        log.warning("only %d of the budget of %d pseudo-labels pass min_confidence=%.3f (pool: %d candidates)",
                    n, budget, pl.min_confidence, sum(candidates))
    if n == 0 or not write:
        return TrainSet([], [], [0] * k, pl.soft_targets), n, pool.precision(counted[2], manifest.classes) if n else None
    ts = write_trainset(source, shards, join(out, "trainset"), min_parts(cfg), tasks,
                        soft=pl.soft_targets, counted=counted)
    return ts, n, pool.precision(counted[2], manifest.classes)


def _reuse_round(out: str) -> finetune.FinetuneResult | None:
    weights = join(out, finetune.WEIGHTS)
    fs, path = filesystem(weights)
    if not fs.exists(path):
        return None
    log.info("%s: reusing %s", out.rsplit("/", 1)[-1], weights)
    _, meta = rio.load_weights(weights)
    extra = json.loads(meta.get("extra", "{}"))
    return finetune.FinetuneResult(weights, rio.file_sha256(weights), [], 0.0,
                                   int(extra.get("steps", 0)), int(extra.get("images_seen", 0)))


def labeled_repeats(n_labeled: int, n_pseudo: int, share: float) -> int:
    """How many copies of each true label make them ``share`` of a round's rows (at least one): with
    equal steps per round, more pseudo-labels would otherwise mean fewer passes over the true labels."""
    if share <= 0 or n_pseudo == 0 or n_labeled == 0:
        return 1
    return max(1, round(share / (1.0 - share) * n_pseudo / n_labeled))


def ran_with(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The precision and layout a training stage ran with, from its last metrics row (None: not recorded)."""
    keys = ("device", "precision", "channels_last", "cpu_bf16_units")
    last = metrics[-1] if metrics else {}
    return {k: last[k] for k in keys} if all(k in last for k in keys) else None


def run_pipeline(cfg: Config, *, resume: bool = False, overwrite: bool = False, config_path: str = "",
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Run the configured method end to end; returns the URI of ``report.json``.

    ``on_round``, when given, is called after each round with ``{"round", "val_accuracy", "val_macro_f1",
    "n_pseudo", "pseudo_precision", "seconds", "pretrain_reused"}`` (tuning reports it to Ray Tune).
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

    classes = manifest.classes
    history: list[dict[str, Any]] = []
    models: list[str] = []
    labeled = labeled_trainset(cfg, manifest, labels, join(cfg.run.output_dir, "round=0"), resume)

    for r in range(rounds + 1):
        t0 = time.time()
        out = join(cfg.run.output_dir, f"round={r}")
        done = _reuse_round(out) if resume else None
        trainset, n_pseudo, precision = labeled, 0, None
        if r > 0:
            pseudo, n_pseudo, precision = pseudo_trainset(
                cfg, manifest, labels, models[-1], min(per_round * r, labels.pool_rows), out,
                join(cfg.run.output_dir, f"predictions/round={r}"), write=done is None)
            copies = labeled_repeats(labels.n_labeled, n_pseudo, pl.labeled_share)
            trainset = labeled.plus(pseudo, copies)
        else:
            copies = 1
        init = byol
        if r > 0 and pl.retrain_from == "previous":
            init = models[-1]
        round_cfg = cfg
        if r > 0 and pl.retrain_lr_scale != 1.0:
            round_cfg = cfg.replace(**{"finetune.lr": cfg.finetune.lr * pl.retrain_lr_scale})
        result = done or finetune.run(round_cfg, trainset, init, out, f"{cfg.run.name}-round{r}", classes, f"round {r}")
        models.append(result.weights)
        val = split_metrics(result.weights, cfg, "val", classes)
        history.append({
            "round": r, "val": val, "n_pseudo": n_pseudo, "train_rows": labels.n_labeled + n_pseudo,
            "steps": result.steps, "images_seen": result.images_seen, "labeled_copies": copies,
            "pseudo_precision": precision["precision"] if precision else None,
            "pseudo_detail": precision, "seconds": time.time() - t0, "model": result.weights,
            "compute": ran_with(result.history),
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

    best = best_round([h["val"][cfg.run.select_metric] for h in history])
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
            "n_train_labeled": labels.n_labeled, "n_unlabeled": labels.pool_rows,
            "n_val": manifest.splits["val"].rows, "n_test": manifest.splits["test"].rows,
        },
        "stages": stages,
        "compute": {**compute, "finetune": history[0]["compute"]},
        "rounds": history,
        "best_round": best,
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
