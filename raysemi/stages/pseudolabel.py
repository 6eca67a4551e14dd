"""Pseudo-labeling: a pool of Ray actors predicts every input shard once, committed per shard.

Each actor loads the classifier once (on its GPU when it has one, else the CPU) and then predicts one
whole input shard per task, in batches of ``pseudolabel.batch_size``, decoding with the eval transform of
the model's own config (its image size and normalisation). The actor writes the prediction shard itself
(the bytes never pass through the driver)::

    <out_uri>/part-NNNNN.parquet       id, pred (int16), confidence (float32), probs (list<float32>)
    <out_uri>/part-NNNNN.commit.json   {"model_sha256", "rows", "input", "written"}, written last

``NNNNN`` is the input shard's index in the list given, so names are stable across runs. A shard counts as
done only when its marker names the same model file (sha256) and input and its Parquet file holds that
many rows; a re-run computes only the others. The driver keeps one task in flight per actor; when an
actor dies (a node lost, an OOM kill) its shard goes back in the queue and a fresh actor replaces it
(an actor that died after its commit has its shard redone: the same file, rewritten, never a second one).
At the end every input row's id must appear in exactly one prediction row, or ``RaysemiError`` says why.

Every row of every input shard gets a prediction (the few labeled rows too: it is cheap), so the
caller filters the pool (null labels plus labels held back) when choosing pseudo-labels with
``select_pseudo_labels`` (``raysemi.stages.selection``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import torch

from raysemi import io as rio
from raysemi import ray_utils
from raysemi.config import Config
from raysemi.data.shards import read_shard, table_bytes
from raysemi.errors import RaysemiError
from raysemi.io import filesystem, join, write_bytes_atomic
from raysemi.stages.common import autocast
from raysemi.stages.selection import check_budget, class_counts, select_pseudo_labels

__all__ = [
    "PRED_SCHEMA",
    "PredictionResult",
    "PredictorPool",
    "ShardPredictor",
    "check_budget",
    "class_counts",
    "model_classes",
    "pending_shards",
    "predict_shards",
    "read_predictions",
    "select_pseudo_labels",
    "verify_exactly_once",
]

log = logging.getLogger("raysemi.pseudolabel")

STAGE = "pseudolabel"  # the stage name in ray_utils.FAULT_ENV: "pseudolabel:<shard index>:0:<marker>"
MAX_ATTEMPTS = 3  # actor deaths tolerated per shard before giving up
_PART = re.compile(r"part-(\d{5,})\.(parquet|commit\.json)$")

PRED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("pred", pa.int16(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
    ]
)


@dataclass(frozen=True)
class PredictionResult:
    out_uri: str
    model_sha256: str
    shards_total: int
    shards_computed: int
    shards_skipped: int
    rows: int  # prediction rows under out_uri (= input rows: checked)
    images_per_s: float  # rows computed / seconds from all actors ready to the last shard committed
    seconds: float  # the whole call: checks, actor start-up, inference, verification
    actor_restarts: int


# ---------------------------------------------------------------- layout and commit markers


def part_uri(out_uri: str, index: int) -> str:
    return join(out_uri, f"part-{index:05d}.parquet")


def marker_uri(out_uri: str, index: int) -> str:
    return join(out_uri, f"part-{index:05d}.commit.json")


def read_marker(out_uri: str, index: int) -> dict | None:
    fs, path = filesystem(marker_uri(out_uri, index))
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_committed(out_uri: str, index: int, input_uri: str, rows: int, model_sha256: str) -> bool:
    """Whether shard ``index`` is already predicted by this model: marker and Parquet agree."""
    marker = read_marker(out_uri, index)
    if not marker or marker.get("model_sha256") != model_sha256:
        return False
    if marker.get("input") != input_uri or marker.get("rows") != rows:
        return False
    try:
        return rio.parquet_rows(part_uri(out_uri, index)) == rows
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return False


def commit(out_uri: str, index: int, input_uri: str, table: pa.Table, model_sha256: str) -> None:
    """Write the prediction shard atomically, then its marker (the commit) last."""
    write_bytes_atomic(part_uri(out_uri, index), table_bytes(table.cast(PRED_SCHEMA)))
    marker = {
        "model_sha256": model_sha256,
        "rows": table.num_rows,
        "input": input_uri,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_bytes_atomic(marker_uri(out_uri, index), json.dumps(marker, indent=2).encode())


def pending_shards(
    out_uri: str, shard_uris: list[str], rows: list[int], model_sha256: str
) -> list[tuple[int, str, int]]:
    """``(index, input uri, rows)`` of the shards not yet committed for this model."""
    _forget_listing(out_uri)
    return [
        (i, u, r) for i, (u, r) in enumerate(zip(shard_uris, rows)) if not is_committed(out_uri, i, u, r, model_sha256)
    ]


def model_classes(model_uri: str) -> list[str]:
    """The class names in a classifier file's safetensors header: a cheap check, in the driver, that the
    file is a raysemi classifier before any actor starts (the header only; no tensors read)."""
    if not rio.exists(model_uri):
        raise RaysemiError(f"pseudolabel: model {model_uri} does not exist")
    try:
        meta = rio.weights_metadata(model_uri)
    except rio.CheckpointError:
        meta = {}
    if "classes" not in meta or "config" not in meta:
        raise RaysemiError(f"pseudolabel: {model_uri} is not a raysemi classifier (safetensors with classes/config)")
    return list(json.loads(meta["classes"]))


def _forget_listing(out_uri: str) -> None:
    """Drop fsspec's cached listing of ``out_uri``: the actors write there from other processes, so a listing
    cached by this process (s3fs keeps them) would hide their new files from ``open``."""
    fs, path = filesystem(out_uri)
    fs.invalidate_cache(path)


def _parts(out_uri: str) -> dict[int, list[str]]:
    """Files under ``out_uri`` by part index (missing folder: none)."""
    fs, path = filesystem(out_uri)
    try:
        names = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return {}
    found: dict[int, list[str]] = {}
    for name in names:
        m = _PART.search(name.rsplit("/", 1)[-1])
        if m:
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def read_predictions(out_uri: str, model_sha256: str | None = None) -> pa.Table:
    """Every committed prediction shard under ``out_uri`` (only those of ``model_sha256`` if given)."""
    tables = []
    parts = sorted(_parts(out_uri))
    _forget_listing(out_uri)
    for index in parts:
        marker = read_marker(out_uri, index)
        if marker is None or (model_sha256 is not None and marker.get("model_sha256") != model_sha256):
            continue
        tables.append(read_shard(part_uri(out_uri, index)).cast(PRED_SCHEMA))
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()


def verify_exactly_once(out_uri: str, shard_uris: list[str], input_rows: list[int] | None = None) -> int:
    """Check that the prediction shards hold each input row's id exactly once; returns the row count."""
    _forget_listing(out_uri)
    pred_ids, in_ids = [], []
    for i, uri in enumerate(shard_uris):
        try:
            ids = read_shard(part_uri(out_uri, i), ["id"]).column("id")
        except (RaysemiError, FileNotFoundError):
            raise RaysemiError(f"exactly-once check failed: no prediction shard for {uri}") from None
        want = input_rows[i] if input_rows is not None else rio.parquet_rows(uri)
        if len(ids) != want:
            raise RaysemiError(
                f"exactly-once check failed: {part_uri(out_uri, i)} holds {len(ids)} rows, its input {uri} {want}"
            )
        pred_ids.append(ids)
        in_ids.append(read_shard(uri, ["id"]).column("id"))
    preds = pa.chunked_array([c for a in pred_ids for c in a.chunks], pa.string())
    inputs = pa.chunked_array([c for a in in_ids for c in a.chunks], pa.string())
    dup = len(preds) - pc.count_distinct(preds).as_py()
    if dup:
        raise RaysemiError(f"exactly-once check failed: {dup} ids have more than one prediction")
    missing = pc.sum(pc.invert(pc.is_in(inputs, value_set=preds))).as_py() or 0
    if missing:
        raise RaysemiError(f"exactly-once check failed: {missing} input rows have no prediction")
    return len(preds)


# ---------------------------------------------------------------- the actor


def predict_batch(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``pred, confidence, probs`` on the CPU for one batch (bf16 autocast on CUDA only)."""
    with torch.inference_mode(), autocast(images.device, "bf16"):
        logits = model(images)
    probs = logits.float().softmax(dim=1).cpu()
    conf, pred = probs.max(dim=1)
    return pred, conf, probs


class ShardPredictor:
    """Loads the classifier once, then predicts whole shards. A Ray actor in the pool
    (``ray.remote(ShardPredictor)``), or a plain object in one process (the benchmark's baseline)."""

    def __init__(
        self, model_uri: str, cfg: Config, model_sha256: str, num_threads: int = 1, fault: str | None = None
    ) -> None:
        from raysemi.models.checkpoint import load_classifier

        torch.set_num_threads(max(1, num_threads))
        self.device = ray_utils.get_device()
        self.model, self.model_cfg, self.classes = load_classifier(model_uri, self.device)
        self.model.eval()
        self.cfg, self.model_sha256, self.fault = cfg, model_sha256, fault

    def ready(self) -> str:
        """One forward pass on a zero batch (kernel selection, allocations), then the device's name."""
        size = self.model_cfg.data.image_size
        zeros = torch.zeros(min(self.cfg.pseudolabel.batch_size, 8), 3, size, size, device=self.device)
        predict_batch(self.model, zeros)
        return str(self.device)

    def predict_table(self, shard_uri: str) -> pa.Table:
        """Predictions for every row of one input shard, in the shard's row order."""
        from raysemi.data.loader import build_loader, resolve_backend

        backend = resolve_backend(self.cfg.data.loader)
        # On the CPU the model already uses the actor's cores: torch decode workers would only compete
        # with it (and fork per shard), so decoding stays in the actor's thread there.
        threads = 0 if backend == "torch" and self.device.type == "cpu" else self.cfg.data.num_threads
        loader = build_loader(
            [shard_uri], mode="eval", size=self.model_cfg.data.image_size, batch_size=self.cfg.pseudolabel.batch_size,
            augment=self.model_cfg.augment, backend=backend, device=self.device, num_threads=threads,
        )
        ids: list[str] = []
        preds, confs, probs = [], [], []
        for batch in loader:
            p, c, pr = predict_batch(self.model, batch["image"])
            ids.extend(batch["id"])
            preds.append(p)
            confs.append(c)
            probs.append(pr)
        return predictions_table(ids, preds, confs, probs, len(self.classes))

    def run(self, index: int, shard_uri: str, out_uri: str, rows: int) -> int:
        """Predict input shard ``index`` and commit it under ``out_uri``; returns the row count."""
        table = self.predict_table(shard_uri)
        if table.num_rows != rows:
            raise RuntimeError(f"the loader gave {table.num_rows} rows of {shard_uri}, which holds {rows}")
        ray_utils.maybe_inject_failure(self.fault, STAGE, index)  # test hook: dies before the commit
        commit(out_uri, index, shard_uri, table, self.model_sha256)
        return table.num_rows


def predictions_table(ids, preds, confs, probs, num_classes: int) -> pa.Table:
    if not ids:
        return PRED_SCHEMA.empty_table()
    p = torch.cat(probs).numpy()
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "pred": pa.array(torch.cat(preds).numpy().astype("int16")),
            "confidence": pa.array(torch.cat(confs).numpy()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1)), num_classes).cast(
                pa.list_(pa.float32())
            ),
        },
        schema=PRED_SCHEMA,
    )


# ---------------------------------------------------------------- the pool (driver side)


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class PredictorPool:
    """``num_actors`` ``ShardPredictor`` actors and a driver loop with one task in flight per actor."""

    def __init__(
        self, model_uri: str, model_sha256: str, cfg: Config, num_actors: int, fault: str | None = None
    ) -> None:
        import ray

        pl = cfg.pseudolabel
        self._remote = ray.remote(ShardPredictor).options(
            num_cpus=pl.cpus_per_actor, num_gpus=pl.gpus_per_actor, max_restarts=0, max_task_retries=0
        )
        self.cfg = cfg
        self._args = (model_uri, cfg, model_sha256, max(1, round(pl.cpus_per_actor)), fault)
        self.actors = [self._new() for _ in range(num_actors)]
        self.restarts = 0

    def _new(self):
        return self._remote.remote(*self._args)

    def _replace(self, slot: int, err: BaseException) -> None:
        import ray

        if getattr(err, "actor_init_failed", False):
            raise RaysemiError(f"a pseudolabel actor could not load the model: {_last_line(err)}")
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new()
        self.restarts += 1

    def wait_ready(self, patience_s: float = 60.0) -> list[str]:
        """Block until every actor has loaded the model (start-up kept out of the throughput figure).
        Says so once when the actors still wait for resources (e.g. GPUs the cluster lacks) after a minute."""
        import ray

        devices: list[str] = []
        for slot in range(len(self.actors)):
            for attempt in range(MAX_ATTEMPTS):
                ref = self.actors[slot].ready.remote()
                if not ray.wait([ref], timeout=patience_s)[0] and patience_s:
                    pl = self.cfg.pseudolabel
                    log.warning(
                        "pseudolabel actors not started after %.0f s: each needs %s CPU and %s GPU; still waiting",
                        patience_s, pl.cpus_per_actor, pl.gpus_per_actor,
                    )
                    patience_s = 0.0
                try:
                    devices.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as err:
                    if attempt == MAX_ATTEMPTS - 1:
                        raise RaysemiError(f"a pseudolabel actor keeps dying at start: {_last_line(err)}") from None
                    self._replace(slot, err)
        return devices

    def run(self, tasks: list[tuple[int, str, int]], out_uri: str, progress: bool = True) -> int:
        """Predict and commit ``(index, input uri, rows)`` tasks; returns the rows computed."""
        import ray
        from tqdm import tqdm

        queue = deque(tasks)
        attempts: dict[int, int] = {}
        inflight: dict = {}  # ObjectRef -> (slot, task)
        done_rows = done_shards = 0
        bar = tqdm(total=sum(t[2] for t in tasks), unit="img", desc=STAGE, disable=not progress, smoothing=0.2)
        bar.set_postfix_str(f"shards 0/{len(tasks)}")

        def submit(slot: int) -> None:
            if queue:
                task = queue.popleft()
                inflight[self.actors[slot].run.remote(task[0], task[1], out_uri, task[2])] = (slot, task)

        try:
            for slot in range(len(self.actors)):
                submit(slot)
            while inflight:
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                slot, task = inflight.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    attempts[task[0]] = attempts.get(task[0], 0) + 1
                    if attempts[task[0]] >= MAX_ATTEMPTS:
                        raise RaysemiError(
                            f"giving up on {task[1]}: its actor died {attempts[task[0]]} times ({_last_line(err)})"
                        ) from None
                    log.warning("a pseudolabel actor died on %s; re-running it on a new actor", task[1])
                    self._replace(slot, err)
                    queue.appendleft(task)
                except ray.exceptions.RayTaskError as err:
                    raise RaysemiError(f"predicting {task[1]} failed: {_last_line(err)}") from None
                else:
                    done_rows += rows
                    done_shards += 1
                    bar.update(rows)
                    bar.set_postfix_str(f"shards {done_shards}/{len(tasks)}")
                submit(slot)
        finally:
            bar.close()
        return done_rows

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


# ---------------------------------------------------------------- entry point


def _remove_stale(out_uri: str, n: int) -> None:
    """Remove parts beyond the current input list (left by an earlier run over more shards)."""
    fs, _ = filesystem(out_uri)
    for index, files in _parts(out_uri).items():
        if index >= n:
            log.warning("removing stale prediction part %05d under %s", index, out_uri)
            for f in sorted(files, key=lambda p: not p.endswith(".json")):  # the marker first
                fs.rm(f)
    _forget_listing(out_uri)


def predict_shards(
    model_uri: str, shard_uris: list[str], out_uri: str, cfg: Config, *, progress: bool = True
) -> PredictionResult:
    """Predict every row of ``shard_uris`` with the classifier at ``model_uri`` into ``out_uri``.

    Shards already committed for the same model file are skipped; the rest go to a pool of
    ``pseudolabel.num_actors`` actors. Ends with the exactly-once check (``RaysemiError`` if violated).
    """
    t0 = time.perf_counter()
    if not shard_uris:
        raise RaysemiError("pseudolabel: no input shards to predict")
    model_classes(model_uri)
    model_sha = rio.file_sha256(model_uri)
    try:
        rows = [rio.parquet_rows(u) for u in shard_uris]
    except FileNotFoundError as err:
        raise RaysemiError(f"pseudolabel: input shard missing ({err})") from None
    _remove_stale(out_uri, len(shard_uris))
    todo = pending_shards(out_uri, list(shard_uris), rows, model_sha)
    skipped = len(shard_uris) - len(todo)
    if skipped:
        log.info("%d of %d shards already predicted by this model: skipped", skipped, len(shard_uris))

    computed_rows, restarts, run_s = 0, 0, 0.0
    if todo:
        ray_utils.init_ray(cfg.ray.address)
        pool = PredictorPool(
            model_uri, model_sha, cfg, min(cfg.pseudolabel.num_actors, len(todo)),
            fault=os.environ.get(ray_utils.FAULT_ENV),
        )
        try:
            devices = pool.wait_ready()
            log.info("%d pseudolabel actors ready on %s", len(devices), ", ".join(sorted(set(devices))))
            t_run = time.perf_counter()
            computed_rows = pool.run(todo, out_uri, progress)
            run_s = time.perf_counter() - t_run
            restarts = pool.restarts
        finally:
            pool.shutdown()

    total = verify_exactly_once(out_uri, list(shard_uris), rows)
    result = PredictionResult(
        out_uri=out_uri,
        model_sha256=model_sha,
        shards_total=len(shard_uris),
        shards_computed=len(todo),
        shards_skipped=skipped,
        rows=total,
        images_per_s=computed_rows / run_s if run_s > 0 else 0.0,
        seconds=time.perf_counter() - t0,
        actor_restarts=restarts,
    )
    log.info(
        "pseudolabel: %d shards (%d computed, %d skipped), %d predictions, each input id exactly once; "
        "%.1f images/s, %d actor restarts, %.1f s",
        result.shards_total, result.shards_computed, result.shards_skipped, result.rows,
        result.images_per_s, result.actor_restarts, result.seconds,
    )
    return result
