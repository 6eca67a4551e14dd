"""``raysemi predict MODEL SOURCE OUT``: classify new images with an exported classifier.

SOURCE is an image folder, an ``s3://`` prefix of images, a CSV of paths or an ingested dataset (one split
or all): ``data/inputs/listing.py`` lists it, streaming the paths into Parquet listing parts under OUT/inputs.
Images that are not in a dataset are staged first by Ray tasks (read and validated once, the bad ones listed
with their reason, exact copies stored once: ``data/inputs/staging.py``); then the pseudo-label actor pool
(``stages/pseudolabel.predict_shards``) predicts every shard exactly once, committed per shard, with as many
actors as the cluster's CPUs (or GPUs, with ``pseudolabel.gpus_per_actor``) hold unless told; then tasks join
paths and predictions chunk by chunk and the driver streams their parts into the result files.

The driver holds per-chunk summaries (rows, shard hash) and reads no image: it walks SOURCE (one folder's
names at a time), and copies the result parts batch by batch.

    OUT/run.json              what is predicted (model sha256, source, split, listing fingerprint): first
    OUT/inputs/               listing parts, staged shards, their chunk records and dedup keys (not for a dataset)
    OUT/predictions/          prediction shards and their commit markers
    OUT/results/              the result parts of the tasks, while the result files are written
    OUT/predictions.parquet   \\
    OUT/predictions.csv        > the results (``commands/predict_output.py``), summary.json last
    OUT/failed.csv, summary.json

Every check (the model, SOURCE, the split, OUT) comes before any image is read or any actor starts. An
earlier run in OUT is refused unless ``resume`` (continue it: the staged chunks and committed prediction
shards are reused, so nothing is computed twice) or ``overwrite`` (remove it first).
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np

from raysemi.commands.predict_output import (
    FINAL,
    RESULTS,
    SUMMARY,
    dataset_results,
    merge_counts,
    result_schema,
    staged_results,
    write_results,
)
from raysemi.core import io as rio
from raysemi.core.config import Config
from raysemi.core.errors import RaysemiError
from raysemi.core.outputs import PREDICT, check_marked, guard_output, mark
from raysemi.data.inputs.listing import Listing, committed_listing, list_source, stream_listing
from raysemi.data.inputs.staging import Staged, map_batched, stage_listing
from raysemi.data.shards import Mapper
from raysemi.distributed import ray_session, ray_tasks
from raysemi.stages.commits import pending_shards
from raysemi.stages.predictor import ShardPredictor, model_classes
from raysemi.stages.pseudolabel import predict_shards

log = logging.getLogger("raysemi.predict")

RECORD = "run.json"
INPUTS = "inputs"
PREDICTIONS_DIR = "predictions"
DATASET_GROUP = 16  # dataset shards per result task
_IDENTITY = {"source": "another source", "split": "another split", "model_sha256": "another model",
             "fingerprint": "another listing of the source (files added or removed since)"}


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
    for name in (SUMMARY, *FINAL, RESULTS, INPUTS, PREDICTIONS_DIR, RECORD):
        target = f"{path.rstrip('/')}/{name}"
        if fs.exists(target):
            fs.rm(target, recursive=True)
    fs.invalidate_cache()


def _guard(out: str, record: dict, resume: bool, overwrite: bool) -> bool:
    """Whether an earlier run in OUT is continued (``resume``: it must predict the same thing)."""
    earlier = rio.exists(rio.join(out, RECORD))
    if earlier and resume and not overwrite:
        old = rio.read_json(rio.join(out, RECORD))
        for key, what in _IDENTITY.items():  # a streamed listing's fingerprint: checked once streamed
            if old.get(key) != record[key] and record[key] is not None:
                raise RaysemiError(f"{out} holds predictions of {what}: pass --overwrite to replace them")
    keep = guard_output(out, "earlier predictions (run.json)", earlier, resume=resume, overwrite=overwrite)
    if earlier and not keep:
        check_marked(out, PREDICT, "earlier predictions (run.json)")
        _remove_earlier(out)
    return keep


def cluster_actors(cfg: Config) -> int:
    """Actors the cluster holds at once: its GPUs / ``gpus_per_actor`` (when set), its CPUs / ``cpus_per_actor``."""
    import ray

    ray_session.init_ray(cfg.ray.address)
    res, pl = ray.cluster_resources(), cfg.pseudolabel
    fits = [res.get(k, 0.0) / per for k, per in (("GPU", pl.gpus_per_actor), ("CPU", pl.cpus_per_actor)) if per > 0]
    return max(1, int(min(fits))) if fits else 1


def _stream(listing: Listing, out: str, resumed: bool) -> Listing:
    """The streamed listing of SOURCE under OUT/inputs: on resume, the earlier one when SOURCE still lists the
    same (one walk to tell), else a new one (one walk, written as it goes)."""
    dest = rio.join(out, INPUTS)
    if resumed:
        now = stream_listing(listing, None)
        earlier = committed_listing(listing, dest)
        if earlier is not None and earlier.fingerprint() == now.fingerprint():
            return earlier
        if now.fingerprint() != rio.read_json(rio.join(out, RECORD)).get("fingerprint"):
            return now  # refused by the caller: another listing, and nothing written
    return stream_listing(listing, dest)


def _results(cfg: Config, listing: Listing, staged: Staged | None, out: str, pred_out: str, classes: list[str],
             min_confidence: float, mapper: Mapper) -> tuple[int, list[dict]]:
    """The result parts, one task per group of chunks (or dataset shards); (parts, their counts)."""
    fs, path = rio.filesystem(rio.join(out, RESULTS))
    if fs.exists(path):
        fs.rm(path, recursive=True)  # an earlier run's parts: every part is written again
    if staged is None:
        shards = [(i, s, u) for i, (s, u, _) in enumerate(listing.shards)]
        groups = [shards[i : i + DATASET_GROUP] for i in range(0, len(shards), DATASET_GROUP)]
        args = [(out, grp, pred_out, classes, min_confidence, g) for g, grp in enumerate(groups)]
        return len(groups), map_batched(mapper, dataset_results, args)
    buf = io.BytesIO()
    np.save(buf, np.asarray(staged.part_of(), dtype=np.int32))
    rio.write_bytes_atomic(rio.join(staged.dest, "parts.npy"), buf.getvalue())
    args = [(out, staged.dest, pred_out, a, b, classes, min_confidence, g) for g, (a, b) in enumerate(staged.groups)]
    return len(args), map_batched(mapper, staged_results, args)


def run(
    cfg: Config, model: str, source: str, out: str, *, split: str = "all", min_confidence: float = 0.5,
    actors: int | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
    predictor: type = ShardPredictor, mapper: Mapper | None = None,
) -> dict:
    """Predict every image of ``source`` into ``out`` (see the module docstring); returns the summary.
    ``mapper`` runs the per-image tasks: Ray tasks on the cluster unless given (``local_map``: in this process)."""
    t0 = time.perf_counter()
    model, out = rio.absolute(model), rio.absolute(out)
    classes = check_model(model)
    if not 0.0 <= min_confidence <= 1.0:
        raise RaysemiError(f"--min-confidence {min_confidence} is not within 0..1")
    if actors is not None and actors < 1:
        raise RaysemiError(f"--actors {actors} must be at least 1")
    listing = list_source(source, split)
    _check_out(out, listing)
    record = {
        "model": model, "model_sha256": rio.file_sha256(model), "source": listing.source, "kind": listing.kind,
        "split": split, "fingerprint": None if listing.streamed else listing.fingerprint(), "classes": classes,
    }
    resumed = _guard(out, record, resume, overwrite)
    try:
        if not resumed:
            mark(out, PREDICT)
        if listing.streamed:
            listing = _stream(listing, out, resumed)
            record["fingerprint"] = listing.fingerprint()
        if resumed and rio.read_json(rio.join(out, RECORD)).get("fingerprint") != record["fingerprint"]:
            raise RaysemiError(f"{out} holds predictions of {_IDENTITY['fingerprint']}: pass --overwrite to replace them")
        if not resumed:
            rio.write_json(rio.join(out, RECORD), record)
    except OSError as err:
        raise RaysemiError(f"cannot write to {out}: {type(err).__name__}: {err}") from None

    mapper = mapper or ray_tasks.task_mapper(cfg.ray.address)
    staged = None
    if listing.streamed:  # read and validated by tasks; the driver sees one summary per chunk
        staged = stage_listing(listing, mapper=mapper, progress=progress)
        uris, rows, hashes = staged.shard_uris, staged.shard_rows, staged.shard_hashes
    else:
        uris, rows, hashes = [u for _, u, _ in listing.shards], listing.shard_rows, [h for _, _, h in listing.shards]
    pred_out = rio.join(out, PREDICTIONS_DIR)
    stats = {"shards": {"total": len(uris), "computed": 0, "reused": 0}, "actor_restarts": 0, "images_per_s": 0.0}
    if uris:
        todo = pending_shards(pred_out, uris, rows, record["model_sha256"], hashes)
        n = actors or (cluster_actors(cfg) if todo else 1)
        result = predict_shards(model, uris, pred_out, cfg.replace(**{"pseudolabel.num_actors": n}),
                                progress=progress, predictor=predictor, input_sha256=hashes, input_rows=rows)
        stats = {
            "shards": {"total": result.shards_total, "computed": result.shards_computed,
                       "reused": result.shards_skipped},
            "actor_restarts": result.actor_restarts, "images_per_s": round(result.images_per_s, 2),
            "actors": n,
        }
    groups, parts = _results(cfg, listing, staged, out, pred_out, classes, min_confidence, mapper)
    counted = merge_counts(parts, classes, min_confidence)
    summary = {
        "model": model, "model_sha256": record["model_sha256"], "source": listing.source, "kind": listing.kind,
        "split": split if listing.kind == "dataset" else None, "classes": classes,
        "images": listing.rows, "ignored": listing.ignored, **counted,
        "run": {**stats, "inputs_chunks_reused": staged.reused if staged else 0, "resumed": resumed,
                "seconds": round(time.perf_counter() - t0, 2)},
    }
    write_results(out, groups, result_schema(classes, staged is None), summary)
    log.info("predict: %d images predicted, %d failed -> %s", counted["predicted"], counted["failed"], out)
    return summary
