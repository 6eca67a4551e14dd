"""Ingest's per-row work, one task per chunk of inputs: read, validate, stage; later, scatter and gather.

1. ``stage_chunk``: the inputs of one chunk of the scan are read (threads: S3 latency, and Pillow decodes
   without the GIL), validated once (``validate.check_image``; DICOM frames rendered), and written with what
   is to be stored (the original bytes, or the normalised ones) as ``<staging>/staged/part-CCCCCC.parquet``.
   Every input gets a row: a failure has its ``reason`` and no image.
2. The plan (``partition.py``, on the small columns of every staged part) says where each kept row goes.
3. ``scatter_chunk``: a staged part's kept rows, cut by destination shard into
   ``<staging>/buckets/<split>/SSSSS/CCCCCC.parquet``.
4. ``gather_shard``: a shard's buckets, in the planned row order, written as the dataset's shard.

So every input is read from the source once, every image decoded once, and every step holds one chunk or
one shard in memory. The driver passes chunk numbers and per-shard counts, never rows.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysemi.core import io as rio
from raysemi.data import shards
from raysemi.data.ingest import partition
from raysemi.data.ingest.dicom import read as dicom
from raysemi.data.ingest.dicom import render as dicom_render
from raysemi.data.ingest.sources import Item, quarantine_escaping
from raysemi.data.ingest.validate import Checked, check_image, encode_array
from raysemi.data.shards import ShardInfo

SMALL = ("source", "sort_key", "label", "group", "group_sort", "split", "sha", "nbytes", "reason", "conversion",
         "dicom_rules", "dicom_syntax")
STAGED = pa.schema(
    [pa.field(n, pa.int64() if n == "nbytes" else pa.string()) for n in SMALL] + [pa.field("image", pa.binary())]
)
MISSING = "missing"  # a file a CSV names is not there: the ingest stops (``Staged.missing``)
ROW_GROUP_BYTES = 32 << 20  # a staged part is written in row groups of about this many image bytes


def staged_uri(staging: str, chunk: int) -> str:
    return rio.join(staging, "staged", f"part-{chunk:06d}.parquet")


def read_input(it: Item) -> bytes:
    """The bytes of one input: its file (local or a URI), or its array encoded as PNG."""
    if it.path is not None:
        return it.path.read_bytes()
    if it.uri is not None:
        return rio.read_bytes(it.uri)
    return encode_array(it.array)


def _render(it: Item, window: tuple[float, float] | None) -> tuple[Checked, bytes | None]:
    try:
        arr, conversion = dicom_render.render(it.dicom, window)
    except dicom.DicomReject as bad:
        return Checked(reason=bad.reason), None
    return Checked(conversion=conversion), encode_array(arr)


def _check(it: Item, max_pixels: int, window: tuple[float, float] | None) -> tuple[Checked, bytes | None, str | None]:
    """(outcome, bytes to store, sha256 of the original bytes) of one input."""
    if it.check is not None:  # quarantined by the scan (DICOM headers, links out of the source)
        return it.check, None, None
    if it.dicom is not None:
        checked, data = _render(it, window)
        return checked, data, shards.image_id(data) if data is not None else None
    try:
        data = read_input(it)
    except OSError as err:
        if it.named and isinstance(err, (FileNotFoundError, IsADirectoryError)):
            return Checked(reason=MISSING), None, None
        return Checked(reason=f"unreadable: {type(err).__name__}"), None, None
    checked = check_image(data, max_pixels=max_pixels)
    return checked, checked.data, shards.image_id(data)


def _none_if_empty(x: str | None) -> str | None:
    return x or None


@dataclass(frozen=True)
class Staged:
    chunk: int
    rows: int
    failed: int
    missing: int = 0  # files a CSV names that are not there
    missing_example: str | None = None


def stage_chunk(
    items: list[Item], chunk: int, staging: str, max_pixels: int, window: tuple[float, float] | None = None,
    tags: tuple[str, ...] = (), threads: int = 8, trees: tuple[Path, ...] | None = None,
) -> Staged:
    """Validate one chunk of inputs and write it as a staged part (see the module docstring). A file that a
    symbolic link leads to out of ``trees`` (the source folders; None: anywhere) is quarantined unread."""
    quarantine_escaping(items, trees)
    schema = pa.schema([*STAGED, *(pa.field(t, pa.string()) for t in tags)])
    fs, path = rio.filesystem(staged_uri(staging, chunk))
    failed, missing, example = 0, 0, None
    with (
        ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool,
        fs.open(path, "wb") as fh,
        pq.ParquetWriter(fh, schema) as writer,
    ):
        batch: list[tuple[Item, Checked, bytes | None, str | None]] = []
        held = 0
        for it, (checked, data, sha) in zip(items, pool.map(lambda i: _check(i, max_pixels, window), items)):
            failed += not checked.ok
            if checked.reason == MISSING and it.named:
                missing += 1
                example = example or it.source
            batch.append((it, checked, data, sha))
            held += len(data or b"")
            if held >= ROW_GROUP_BYTES:
                writer.write_table(_rows(batch, schema, tags))
                batch, held = [], 0
        writer.write_table(_rows(batch, schema, tags))
    return Staged(chunk, len(items), failed, missing, example)


def _rows(batch: list, schema: pa.Schema, tags: tuple[str, ...]) -> pa.Table:
    ok = [c.ok for _, c, _, _ in batch]
    cols = {
        "source": [it.source for it, *_ in batch],
        "sort_key": [_none_if_empty(it.sort_key) for it, *_ in batch],
        "label": [it.label for it, *_ in batch],
        "group": [it.group for it, *_ in batch],
        "group_sort": [_none_if_empty(it.group_sort) for it, *_ in batch],
        "split": [it.split for it, *_ in batch],
        "sha": [sha if good else None for (_, _, _, sha), good in zip(batch, ok)],
        "nbytes": [len(d) if good else 0 for (_, _, d, _), good in zip(batch, ok)],
        "reason": [c.reason for _, c, _, _ in batch],
        "conversion": [c.conversion for _, c, _, _ in batch],
        "dicom_rules": [it.dicom.rules if it.dicom is not None and good else None for (it, *_), good in zip(batch, ok)],
        "dicom_syntax": [it.dicom.syntax if it.dicom is not None and good else None
                         for (it, *_), good in zip(batch, ok)],
        "image": [d if good else None for (_, _, d, _), good in zip(batch, ok)],
        **{t: [it.dicom.tags.get(t) if it.dicom else None for it, *_ in batch] for t in tags},
    }
    return pa.table(cols, schema=schema)


def read_index(staging: str, chunk: int) -> pa.Table:
    """The small columns of a staged part, with its chunk number and each row's number in it."""
    t = shards.read_shard(staged_uri(staging, chunk), list(SMALL))
    return t.append_column("chunk", pa.array([chunk] * t.num_rows, pa.int32())).append_column(
        "row", pa.array(range(t.num_rows), pa.int32()))


def plan_uri(staging: str) -> str:
    return rio.join(staging, "plan.parquet")


@dataclass(frozen=True)
class PlanSummary:
    """What the plan tells the driver: per-chunk and per-shard numbers, never rows."""

    row_groups: dict[int, int]  # chunk -> its row group in plan.parquet (chunks with nothing kept: absent)
    sizes: dict[str, list[int]]  # rows per shard, per split
    label_counts: dict[str, dict[str, int]]  # per split: rows per class
    quarantined: dict[str, int]  # reason kind -> inputs
    first_failure: tuple[str, str] | None  # (source, reason) of the first input quarantined
    duplicates: int
    converted: dict[str, int]
    groups_across_splits: int
    dicom_rules: dict[str, int]
    dicom_syntaxes: dict[str, int]

    @property
    def kept(self) -> int:
        return sum(sum(v) for v in self.sizes.values())


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(column.drop_null())
    return dict(sorted(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))


def plan_dataset(
    staging: str, chunks: int, quarantine_uri: str, carve: dict[str, float], seed: int, shard_mb: float,
    min_shards: int, threads: int = 8,
) -> PlanSummary:
    """Dedup, carve and plan (``partition.py``) over the small columns of every staged part; write the plan
    (one row group per chunk) and the quarantine list; return the summary."""
    with ThreadPoolExecutor(threads) as pool:
        index = pa.concat_tables(pool.map(lambda c: read_index(staging, c), range(chunks)))
    deduped = partition.dedup(index)
    kept = partition.carve_group_splits(deduped.kept, carve, seed)
    where = partition.plan_shards(kept, shard_mb, min_shards, seed)
    plan = pa.table({
        "chunk": kept.column("chunk"), "row": kept.column("row"), "split": kept.column("split"),
        "shard": pa.array(where.shard, pa.int32()), "pos": pa.array(where.pos, pa.int64()),
    }).sort_by([("chunk", "ascending"), ("row", "ascending")])
    row_groups = {}
    if plan.num_rows:
        fs, path = rio.filesystem(plan_uri(staging))
        with fs.open(path, "wb") as fh, pq.ParquetWriter(fh, plan.schema) as writer:
            bounds = np.flatnonzero(np.diff(plan.column("chunk").to_numpy(), prepend=-1, append=-1))
            for n, (a, b) in enumerate(itertools.pairwise(bounds)):
                writer.write_table(plan.slice(a, b - a))
                row_groups[int(plan.column("chunk")[a].as_py())] = n
        rio.write_bytes_atomic(quarantine_uri, shards.table_bytes(deduped.quarantine.cast(shards.QUARANTINE_SCHEMA)))
    q = deduped.quarantine
    return PlanSummary(
        row_groups=row_groups,
        sizes=where.sizes,
        label_counts={s: _counts(kept.filter(pc.equal(kept.column("split"), s)).column("label"))
                      for s in partition.SPLITS},
        quarantined=shards.reason_counts(q.column("reason").to_pylist()),
        first_failure=(q.column("source")[0].as_py(), q.column("reason")[0].as_py()) if q.num_rows else None,
        duplicates=deduped.duplicates,
        converted=_counts(kept.column("conversion")),
        groups_across_splits=partition.groups_across_splits(kept),
        dicom_rules=_counts(kept.column("dicom_rules")),
        dicom_syntaxes=_counts(kept.column("dicom_syntax")),
    )


def bucket_dir(staging: str, split: str, shard: int) -> str:
    return rio.join(staging, "buckets", split, f"{shard:05d}")


def scatter_chunk(staging: str, chunk: int, plan_group: int | None, tags: tuple[str, ...] = ()) -> int:
    """Cut a staged part's kept rows by destination shard into bucket files; returns the rows written."""
    if plan_group is None:  # nothing of this chunk is kept
        return 0
    with rio.open_exact(plan_uri(staging)) as fh:
        plan = pq.ParquetFile(fh).read_row_group(plan_group)
    rows = shards.read_shard(staged_uri(staging, chunk), ["source", "label", "group", "sha", "image", *tags])
    rows = rows.take(plan.column("row")).append_column("pos", plan.column("pos"))
    plan_split, plan_shard = plan.column("split").to_pylist(), plan.column("shard").to_numpy()
    written = 0
    for split, shard in sorted({(s, int(k)) for s, k in zip(plan_split, plan_shard)}):
        mask = pc.and_(pc.equal(plan.column("split"), split), pc.equal(plan.column("shard"), shard))
        part = rows.filter(mask)
        rio.write_bytes_atomic(rio.join(bucket_dir(staging, split, shard), f"{chunk:06d}.parquet"),
                               shards.table_bytes(part))
        written += part.num_rows
    return written


def gather_shard(
    staging: str, dest: str, split: str, shard: int, rows: int, classes: list[str], tags: tuple[str, ...] = ()
) -> ShardInfo:
    """Write shard ``shard`` of ``split`` from its buckets, in the planned order; checks it got ``rows``."""
    fs, path = rio.filesystem(bucket_dir(staging, split, shard))
    names = sorted(n for n in fs.ls(path, detail=False) if n.endswith(".parquet"))
    parts = []
    for name in names:
        with fs.open(name, "rb") as fh:
            parts.append(pq.read_table(fh))
    t = pa.concat_tables(parts).sort_by("pos")
    if t.num_rows != rows or t.column("pos").to_pylist() != list(range(rows)):
        raise shards.DatasetError(f"ingest: shard {split}/{shard} got {t.num_rows} rows, {rows} planned")
    label = pc.index_in(t.column("label"), value_set=pa.array(classes, pa.string())).cast(pa.int16())
    table = pa.table(
        {"id": t.column("sha"), "image": t.column("image"), "label": label, "group": t.column("group"),
         "source": t.column("source"), **{n: t.column(n) for n in tags}},
        schema=pa.schema([*shards.SCHEMA, *(pa.field(n, pa.string()) for n in tags)]),
    )
    return shards.write_shard(dest, f"{split}/part-{shard:05d}.parquet", table)


def default_threads() -> int:
    return min(8, os.cpu_count() or 2)
