"""The training set of a fine-tuning round, written as shards of its own by Ray tasks.

Each round trains on rows picked from shards that may hold millions, so those rows are copied into
parts (``id, image, label, weight``, and ``target`` with soft targets) that the loader streams like any
other dataset; the Ray Train workers then need no id filtering and every rank gets an equal share.

A ``RowSource`` says which rows of a dataset shard belong (the chosen labels: ``LabeledRows``; a round's
pseudo-labels: ``stages.pool.PseudoRows``) from that shard's small columns alone. One pass of tasks counts
them per shard; the driver then cuts the concatenation of all chosen rows (in shard order) into parts of
equal rows, sized by bytes, and one task per part reads only its rows: the small columns to find them,
then the image column of just the row groups that hold them. The driver sees counts, never rows.

The labelled rows are written once per run (round 0's set); a later round's ``TrainSet`` lists those parts
(``copies`` times, the oversampling of the true labels) beside the round's pseudo-label parts.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysemi.core.io import filesystem, join, open_exact, read_json, write_bytes_atomic, write_json
from raysemi.core.outputs import TRAINSET, clear
from raysemi.data.labels import LabelRule
from raysemi.data.shards import DatasetError, Mapper, local_map, read_shard, shard_groups, table_bytes

TRAINSET_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.binary()), ("label", pa.int16()), ("weight", pa.float32())]
)
PART_BYTES = 128 << 20  # a part's target size: the loader reads one whole part at a time
DESCRIPTION = "_trainset.json"  # written last: the set is complete; "_": Parquet readers skip it


@dataclass(frozen=True)
class TrainSet:
    uris: list[str]
    rows: list[int]  # per shard
    class_counts: list[int]
    soft: bool = False  # the shards hold a ``target`` column of class probabilities

    @property
    def total(self) -> int:
        return sum(self.rows)

    def plus(self, other: TrainSet, copies: int = 1) -> TrainSet:
        """These parts ``copies`` times (each listed again: read again each epoch), then ``other``'s; the targets
        are ``other``'s kind (these parts must then hold a ``target`` column too when it is soft)."""
        return TrainSet(self.uris * copies + other.uris, self.rows * copies + other.rows,
                        [a * copies + b for a, b in zip(self.class_counts, other.class_counts)], other.soft)


@dataclass(frozen=True)
class SourceShard:
    uri: str  # the dataset shard
    split: str
    rows: int
    predictions: str | None = None  # its prediction part, in a pseudo-label round


class RowSource(Protocol):
    num_classes: int

    def chosen_rows(self, shard: SourceShard) -> pa.Table:
        """The shard's rows that belong, in shard order: ``row`` (index in the shard), ``id``, ``label``,
        ``weight`` and, when ``soft``, ``target``."""

    def tally(self, rows: pa.Table, shard: SourceShard) -> np.ndarray:
        """Counts to sum over shards (class counts first)."""


def one_hot(labels: np.ndarray, num_classes: int) -> pa.Array:
    eye = np.eye(num_classes, dtype=np.float32)[labels]
    return pa.FixedSizeListArray.from_arrays(pa.array(eye.reshape(-1)), num_classes).cast(pa.list_(pa.float32()))


@dataclass(frozen=True)
class LabeledRows:
    """The train split's labels that ``rule`` keeps, weight 1 (one-hot targets when ``soft``)."""

    rule: LabelRule
    num_classes: int
    soft: bool = False

    def chosen_rows(self, shard: SourceShard) -> pa.Table:
        table = read_shard(shard.uri, ["id", "label"])
        keep = self.rule.chosen(table) if shard.split == "train" else np.zeros(table.num_rows, dtype=bool)
        rows = np.flatnonzero(keep)
        labels = table.column("label").take(pa.array(rows)).to_numpy(zero_copy_only=False).astype(np.int64)
        out = pa.table({"row": pa.array(rows, pa.int64()), "id": table.column("id").take(pa.array(rows)),
                        "label": pa.array(labels, pa.int16()),
                        "weight": pa.array(np.ones(len(rows), np.float32))})
        return out.append_column("target", one_hot(labels, self.num_classes)) if self.soft else out

    def tally(self, rows: pa.Table, shard: SourceShard) -> np.ndarray:
        return np.bincount(rows.column("label").to_numpy().astype(np.int64), minlength=self.num_classes)


def read_images(uri: str, rows: np.ndarray) -> pa.ChunkedArray:
    """The ``image`` values of ``rows`` (sorted indices) of a shard, reading only their row groups."""
    with open_exact(uri) as fh:
        pf = pq.ParquetFile(fh)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist(), columns=["image"])
    offset = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])  # where each read group begins
    local = offset[np.searchsorted(groups, group_of)] + rows - starts[group_of]
    return table.column("image").take(pa.array(local, pa.int64()))


def _image_bytes_per_row(uri: str) -> float:
    with open_exact(uri) as fh:
        meta = pq.read_metadata(fh)
    col = meta.schema.names.index("image")
    total = sum(meta.row_group(g).column(col).total_compressed_size for g in range(meta.num_row_groups))
    return total / max(meta.num_rows, 1)


def count_task(source: RowSource, shards: list[SourceShard]) -> list[tuple[int, float, np.ndarray]]:
    """One task: per shard, the rows that belong, their estimated image bytes, and the source's tally."""
    out = []
    for shard in shards:
        rows = source.chosen_rows(shard)
        size = rows.num_rows * _image_bytes_per_row(shard.uri) if rows.num_rows else 0.0
        out.append((rows.num_rows, size, source.tally(rows, shard)))
    return out


def write_part(source: RowSource, pieces: list[tuple[SourceShard, int, int]], uri: str) -> int:
    """One task: rows ``[start, stop)`` of each piece's chosen rows, with their images, as one part."""
    tables = []
    for shard, start, stop in pieces:
        rows = source.chosen_rows(shard).slice(start, stop - start)
        images = read_images(shard.uri, rows.column("row").to_numpy())
        table = pa.table([rows.column("id"), images, rows.column("label"), rows.column("weight")],
                         schema=TRAINSET_SCHEMA)
        if "target" in rows.column_names:
            table = table.append_column(pa.field("target", pa.list_(pa.float32())), rows.column("target"))
        tables.append(table)
    table = pa.concat_tables(tables)
    write_bytes_atomic(uri, table_bytes(table))
    return table.num_rows


def plan_parts(counts: list[int], num_parts: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenation of every shard's ``counts`` chosen rows into ``num_parts`` runs of equal rows
    (within one): per part, ``(shard index, start, stop)`` pieces of those shards' chosen rows."""
    total = sum(counts)
    bounds = [total * j // num_parts for j in range(num_parts + 1)]
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for a, b in itertools.pairwise(bounds):
        pieces = []
        first = int(np.searchsorted(starts, a, side="right")) - 1  # the shard holding row a
        for s in range(max(first, 0), len(counts)):
            if starts[s] >= b:
                break
            lo, hi = max(a, starts[s]), min(b, starts[s + 1])
            if lo < hi:
                pieces.append((s, int(lo - starts[s]), int(hi - starts[s])))
        parts.append(pieces)
    return [p for p in parts if p]


def count_rows(source: RowSource, shards: list[SourceShard], map_fn: Mapper = local_map
               ) -> tuple[list[int], float, np.ndarray]:
    """Rows that belong per shard, their estimated image bytes and the summed tally (tasks of ``map_fn``)."""
    groups = shard_groups(shards, [s.rows for s in shards])
    results = map_fn(count_task, [(source, g) for g in groups])
    flat = [r for group in results for r in group]
    tally = np.sum([r[2] for r in flat], axis=0) if flat else np.zeros(source.num_classes, dtype=np.int64)
    return [r[0] for r in flat], float(sum(r[1] for r in flat)), tally


def write_trainset(source: RowSource, shards: list[SourceShard], out_uri: str, min_parts: int,
                   map_fn: Mapper = local_map, soft: bool = False,
                   counted: tuple[list[int], float, np.ndarray] | None = None) -> TrainSet:
    """Write the rows of ``source`` into at least ``min_parts`` parts under ``out_uri`` (more when they
    exceed ``PART_BYTES`` each; a multiple of ``min_parts``), then ``_trainset.json``; returns the set. One
    task of ``map_fn`` per part."""
    counts, size, tally = counted if counted is not None else count_rows(source, shards, map_fn)
    total = sum(counts)
    if total == 0:
        raise DatasetError("the training set is empty: no rows were chosen")
    num_parts = min(total, min_parts * max(1, math.ceil(size / (PART_BYTES * min_parts))))
    plan = plan_parts(counts, num_parts)
    clear(out_uri, TRAINSET)  # an earlier set's parts (more of them, other rows) and description
    uris = [join(out_uri, f"part-{j:05d}.parquet") for j in range(len(plan))]
    tasks = [(source, [(shards[s], a, b) for s, a, b in pieces], uri) for pieces, uri in zip(plan, uris)]
    rows = map_fn(write_part, tasks)
    if sum(rows) != total:
        raise DatasetError(f"the training set under {out_uri} holds {sum(rows)} rows, not the {total} counted")
    trainset = TrainSet(uris, rows, [int(x) for x in tally[: source.num_classes]], soft)
    write_json(join(out_uri, DESCRIPTION), asdict(trainset))
    return trainset


def read_trainset(out_uri: str) -> TrainSet | None:
    """The training set described under ``out_uri``, if it was completed."""
    fs, path = filesystem(join(out_uri, DESCRIPTION))
    if not fs.exists(path):
        return None
    try:
        return TrainSet(**read_json(join(out_uri, DESCRIPTION)))
    except (TypeError, json.JSONDecodeError):
        return None
