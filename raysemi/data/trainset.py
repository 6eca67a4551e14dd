"""The training set of a fine-tuning round, written as shards of its own: labelled + pseudo-labelled rows.

Each round trains on a few thousand rows picked from shards that may hold millions, so those rows are
copied once into small shards (``id, image, label, weight``) that the loader streams like any other; the
Ray Train workers then need no id filtering and every rank gets an equal share. With soft targets
(Noisy Student) a ``target`` column holds each row's class probabilities: one-hot for a true label, the
teacher's (sharpened) probabilities for a pseudo-label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from raysemi.data.shards import DatasetError, Manifest, read_shard, table_bytes
from raysemi.io import join, write_bytes_atomic

TRAINSET_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.binary()), ("label", pa.int16()), ("weight", pa.float32())]
)


@dataclass(frozen=True)
class TrainSet:
    uris: list[str]
    rows: list[int]  # per shard
    class_counts: list[int]
    soft: bool = False  # the shards hold a ``target`` column of class probabilities

    @property
    def total(self) -> int:
        return sum(self.rows)


def write_trainset(
    root: str,
    manifest: Manifest,
    rows: dict[str, tuple[int, float]],
    out_uri: str,
    num_shards: int,
    splits: tuple[str, ...] = ("train", "unlabeled"),
    targets: dict[str, list[float]] | None = None,
    repeats: dict[str, int] | None = None,
) -> TrainSet:
    """Copy the rows ``{id: (label, weight)}`` out of the dataset's ``splits`` into ``num_shards`` shards.

    ``targets`` (soft targets: ``{id: class probabilities}``) adds a ``target`` column; rows it does not
    name get the one-hot vector of their label. ``repeats`` writes a row that many times (oversampling the
    true labels among many pseudo-labels); the class counts count every copy."""
    if not rows:
        raise DatasetError("the training set is empty: no labelled rows were chosen")
    wanted = pa.array(sorted(rows), pa.string())
    parts = []
    for split in splits:
        if split not in manifest.splits:
            continue
        for uri in manifest.shard_uris(root, split):
            t = read_shard(uri, ["id", "image"])
            parts.append(t.filter(pc.is_in(t.column("id"), value_set=wanted)))
    found = pa.concat_tables(parts) if parts else pa.table({"id": [], "image": []})
    ids = found.column("id").to_pylist()
    missing = len(rows) - len(set(ids))
    if missing:
        raise DatasetError(f"{missing} training rows were not found in the dataset {root}")
    # Deterministic order that mixes classes across shards.
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    repeats = repeats or {}
    order = [i for i in order for _ in range(max(1, repeats.get(ids[i], 1)))]
    found = found.take(pa.array(order, pa.int64()))
    ids = found.column("id").to_pylist()
    labels = pa.array([rows[i][0] for i in ids], pa.int16())
    weights = pa.array([rows[i][1] for i in ids], pa.float32())
    table = pa.table([found.column("id"), found.column("image"), labels, weights], schema=TRAINSET_SCHEMA)
    n_classes = max(manifest.num_classes, 1)
    if targets is not None:
        eye = [[1.0 if k == c else 0.0 for k in range(n_classes)] for c in range(n_classes)]
        soft = [targets[i] if i in targets else eye[rows[i][0]] for i in ids]
        table = table.append_column(pa.field("target", pa.list_(pa.float32())), pa.array(soft, pa.list_(pa.float32())))
    num_shards = max(1, min(num_shards, table.num_rows))
    uris, counts = [], []
    for s in range(num_shards):
        part = table.take(pa.array(range(s, table.num_rows, num_shards)))
        uri = join(out_uri, f"part-{s:05d}.parquet")
        write_bytes_atomic(uri, table_bytes(part))
        uris.append(uri)
        counts.append(part.num_rows)
    class_counts = [0] * n_classes
    for i in ids:
        class_counts[rows[i][0]] += 1
    return TrainSet(uris, counts, class_counts, soft=targets is not None)
