"""``raysemi predict MODEL SOURCE OUT``: classify new images with an exported classifier.

SOURCE is an image folder, an ``s3://`` prefix of images, a CSV of paths or an ingested dataset (one split
or all): ``data/image_inputs.py`` lists it. Images that are not in a dataset are staged first (read and
validated once, the bad ones listed with their reason: ``data/image_staging.py``); then the pseudo-label
actor pool (``stages/pseudolabel.predict_shards``) predicts every shard exactly once, committed per shard,
with as many actors as the cluster's CPUs (or GPUs, with ``pseudolabel.gpus_per_actor``) hold unless told.

    OUT/run.json              what is predicted (model sha256, source, split, listing fingerprint): first
    OUT/inputs/               staged shards and their chunk records (not for a dataset)
    OUT/predictions/          prediction shards and their commit markers
    OUT/predictions.parquet   \\
    OUT/predictions.csv        > the results (``stages/classify_output.py``), summary.json last
    OUT/failed.csv, summary.json

Every check (the model, SOURCE, the split, OUT) comes before any image is read or any actor starts. An
earlier run in OUT is refused unless ``resume`` (continue it: the staged chunks and committed prediction
shards are reused, so nothing is computed twice) or ``overwrite`` (remove it first).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa

from raysemi import io as rio
from raysemi import ray_utils
from raysemi.config import Config
from raysemi.data.image_inputs import Listing, list_source
from raysemi.data.image_staging import stage_images
from raysemi.data.shards import read_shard
from raysemi.errors import RaysemiError
from raysemi.outputs import PREDICT, check_marked, guard_output, mark
from raysemi.stages.classify_output import (
    FINAL,
    SUMMARY,
    counts,
    failed_rows,
    prediction_rows,
    write_results,
)
from raysemi.stages.commits import PRED_SCHEMA, pending_shards, read_predictions
from raysemi.stages.predictor import ShardPredictor, model_classes
from raysemi.stages.pseudolabel import predict_shards

log = logging.getLogger("raysemi.predict")

RECORD = "run.json"
INPUTS = "inputs"
PREDICTIONS_DIR = "predictions"
_IDENTITY = {"source": "another source", "split": "another split", "model_sha256": "another model",
             "fingerprint": "another listing of the source (files added or removed since)"}


def _absolute(uri: str) -> str:
    return uri if rio.is_remote(uri) else str(Path(uri).expanduser().resolve())


def check_model(model: str) -> list[str]:
    """The class names of a raysemi classifier at ``model``; one line otherwise."""
    if not rio.exists(model):
        raise RaysemiError(f"model {model} does not exist")
    try:
        return model_classes(model)
    except RaysemiError as err:
        raise RaysemiError(str(err).removeprefix("pseudolabel: ")) from None


def _check_out(out: str, listing: Listing) -> None:
    if listing.kind in ("folder", "prefix") and rio.join(out, "").startswith(rio.join(listing.source, "")):
        raise RaysemiError(f"output {out} is inside the source {listing.source}")
    if not rio.is_remote(out) and Path(out).exists() and not Path(out).is_dir():
        raise RaysemiError(f"output {out} exists and is not a folder")


def _remove_earlier(out: str) -> None:
    """The summary first, the record last, so that a half-removed OUT never looks finished."""
    fs, path = rio.filesystem(out)
    for name in (SUMMARY, *FINAL, INPUTS, PREDICTIONS_DIR, RECORD):
        target = f"{path.rstrip('/')}/{name}"
        if fs.exists(target):
            fs.rm(target, recursive=True)
    fs.invalidate_cache()


def _guard(out: str, record: dict, resume: bool, overwrite: bool) -> bool:
    """Whether an earlier run in OUT is continued (``resume``: it must predict the same thing)."""
    earlier = rio.exists(rio.join(out, RECORD))
    if earlier and resume and not overwrite:
        old = rio.read_json(rio.join(out, RECORD))
        for key, what in _IDENTITY.items():
            if old.get(key) != record[key]:
                raise RaysemiError(f"{out} holds predictions of {what}: pass --overwrite to replace them")
    keep = guard_output(out, "earlier predictions (run.json)", earlier, resume=resume, overwrite=overwrite)
    if earlier and not keep:
        check_marked(out, PREDICT, "earlier predictions (run.json)")
        _remove_earlier(out)
    return keep


def cluster_actors(cfg: Config) -> int:
    """Actors the cluster holds at once: its GPUs / ``gpus_per_actor`` (when set), its CPUs / ``cpus_per_actor``."""
    import ray

    ray_utils.init_ray(cfg.ray.address)
    res, pl = ray.cluster_resources(), cfg.pseudolabel
    fits = [res.get(k, 0.0) / per for k, per in (("GPU", pl.gpus_per_actor), ("CPU", pl.cpus_per_actor)) if per > 0]
    return max(1, int(min(fits))) if fits else 1


def _dataset_index(listing: Listing) -> pa.Table:
    parts = []
    for split, uri, _ in listing.shards:
        t = read_shard(uri, ["id", "source"])
        parts.append(pa.table({
            "path": t.column("source"), "id": t.column("id"), "reason": pa.nulls(t.num_rows, pa.string()),
            "split": pa.array([split] * t.num_rows, pa.string()),
        }))
    return pa.concat_tables(parts)


def run(
    cfg: Config, model: str, source: str, out: str, *, split: str = "all", min_confidence: float = 0.5,
    actors: int | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
    predictor: type = ShardPredictor,
) -> dict:
    """Predict every image of ``source`` into ``out`` (see the module docstring); returns the summary."""
    t0 = time.perf_counter()
    model, out = _absolute(model), _absolute(out)
    classes = check_model(model)
    if not 0.0 <= min_confidence <= 1.0:
        raise RaysemiError(f"--min-confidence {min_confidence} is not within 0..1")
    if actors is not None and actors < 1:
        raise RaysemiError(f"--actors {actors} must be at least 1")
    listing = list_source(source, split)
    _check_out(out, listing)
    record = {
        "model": model, "model_sha256": rio.file_sha256(model), "source": listing.source, "kind": listing.kind,
        "split": split, "fingerprint": listing.fingerprint(), "classes": classes,
    }
    resumed = _guard(out, record, resume, overwrite)
    if not resumed:
        try:
            mark(out, PREDICT)
            rio.write_json(rio.join(out, RECORD), record)
        except OSError as err:
            raise RaysemiError(f"cannot write to {out}: {type(err).__name__}: {err}") from None

    reused_chunks = 0
    hashes = None  # staged inputs: hashed by predict_shards
    if listing.kind == "dataset":
        uris = [u for _, u, _ in listing.shards]
        hashes = [h for _, _, h in listing.shards]
        index = _dataset_index(listing)
    else:
        staged = stage_images(listing.images, rio.join(out, INPUTS), progress=progress)
        uris, index, reused_chunks = staged.shard_uris, staged.index, staged.reused
    pred_out = rio.join(out, PREDICTIONS_DIR)
    stats = {"shards": {"total": len(uris), "computed": 0, "reused": 0}, "actor_restarts": 0, "images_per_s": 0.0}
    if uris:
        todo = pending_shards(pred_out, uris, [rio.parquet_rows(u) for u in uris], record["model_sha256"], hashes)
        n = actors or (cluster_actors(cfg) if todo else 1)
        result = predict_shards(model, uris, pred_out, cfg.replace(**{"pseudolabel.num_actors": n}),
                                progress=progress, predictor=predictor, input_sha256=hashes)
        stats = {
            "shards": {"total": result.shards_total, "computed": result.shards_computed,
                       "reused": result.shards_skipped},
            "actor_restarts": result.actor_restarts, "images_per_s": round(result.images_per_s, 2),
            "actors": n,
        }
        preds = read_predictions(pred_out, record["model_sha256"])
    else:  # every image failed: nothing to predict, no actor to start
        preds = PRED_SCHEMA.empty_table()
    table = prediction_rows(index, preds, classes)
    failed = failed_rows(index)
    summary = {
        "model": model, "model_sha256": record["model_sha256"], "source": listing.source, "kind": listing.kind,
        "split": split if listing.kind == "dataset" else None, "classes": classes,
        "images": index.num_rows, "ignored": listing.ignored,
        **counts(table, failed, classes, min_confidence),
        "run": {**stats, "inputs_chunks_reused": reused_chunks, "resumed": resumed,
                "seconds": round(time.perf_counter() - t0, 2)},
    }
    write_results(out, table, failed, summary)
    log.info("predict: %d images predicted, %d failed -> %s", table.num_rows, failed.num_rows, out)
    return summary
