"""Exact copies across staged chunks, found by tasks bucketed by id prefix (see ``staging.py``).

    <dest>/keys-GGGGG.parquet   id, pos (listing position), bucket: a staging task's chunks' ids (each id's first
                                row in its chunk), sorted by id, one row group per id-prefix bucket
    <dest>/dups-BBBBB.parquet   chunk, id, owner: the later copies of bucket B's ids, and the chunk that stores each

A bucket's task reads only its row group of each key file, so the keys are read once in all; no process holds
more than one bucket's ids. The copy of an id stored is its first in listing order, as the earlier in-memory
staging chose.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysemi.core import io as rio
from raysemi.data.inputs.chunks import read_record, write_chunk
from raysemi.data.shards import DatasetError, Mapper, read_shard

KEYS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("pos", pa.int64()), pa.field("bucket", pa.int32())])
DUPS_SCHEMA = pa.schema([pa.field("chunk", pa.int64()), pa.field("id", pa.string()), pa.field("owner", pa.int64())])


def keys_uri(dest: str, first: int) -> str:
    return rio.join(dest, f"keys-{first:05d}.parquet")


def dups_uri(dest: str, b: int) -> str:
    return rio.join(dest, f"dups-{b:05d}.parquet")


def bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """The id-prefix bucket of sha256 hex ids: their first 8 hex digits scaled to ``buckets``."""
    head = np.array([int(h, 16) for h in pc.utf8_slice_codeunits(ids, 0, 8).to_pylist()], dtype=np.int64)
    return ((head * buckets) >> 32).astype(np.int32)


def _parquet(writes: list[pa.Table], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as w:
        for t in writes:
            w.write_table(t)  # one row group each (below the writer's maximum)
    return buf.getvalue()


def write_keys(dest: str, first: int, chunks: list[dict[str, int]], buckets: int) -> None:
    """The key file of the staging task whose chunks begin at ``first``: ``chunks`` maps each id to its position."""
    ids = pa.array([i for keys in chunks for i in keys], pa.string())
    pos = pa.array([p for keys in chunks for p in keys.values()], pa.int64())
    order = pc.sort_indices(ids)
    t = pa.table({"id": ids.take(order), "pos": pos.take(order)})
    t = t.append_column("bucket", pa.array(bucket_of(t.column("id").combine_chunks(), buckets), pa.int32()))
    b = t.column("bucket").to_numpy()
    cuts = np.flatnonzero(np.diff(b)) + 1 if len(b) else np.array([], int)
    edges = [0, *cuts.tolist(), len(b)]
    rio.write_bytes_atomic(keys_uri(dest, first),
                           _parquet([t.slice(a, z - a) for a, z in itertools.pairwise(edges) if z > a], KEYS_SCHEMA))


def copies_in_bucket(dest: str, firsts: list[int], b: int, size: int) -> dict[int, int]:
    """A task: bucket ``b``'s later copies, written to its dups file; returns their count per chunk."""
    parts = []
    for first in firsts:
        with rio.open_exact(keys_uri(dest, first)) as fh:
            f = pq.ParquetFile(fh)
            col = f.schema_arrow.get_field_index("bucket")
            groups = [i for i in range(f.num_row_groups) if f.metadata.row_group(i).column(col).statistics.min == b]
            if groups:
                parts.append(f.read_row_groups(groups, columns=["id", "pos"]))
    t = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string()), "pos": pa.array([], pa.int64())})
    t = t.take(pc.sort_indices(t, [("id", "ascending"), ("pos", "ascending")]))
    ids, pos = t.column("id").combine_chunks(), t.column("pos").to_numpy()
    later = np.zeros(len(pos), bool)
    if len(pos) > 1:
        later[1:] = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    run_start = np.maximum.accumulate(np.where(~later, np.arange(len(pos)), 0)) if len(pos) else np.array([], int)
    keep = np.flatnonzero(later)
    chunk = pos[keep] // size
    order = np.argsort(chunk, kind="stable")
    dups = pa.table({"chunk": pa.array(chunk[order], pa.int64()), "id": ids.take(pa.array(keep[order])),
                     "owner": pa.array(pos[run_start[keep]][order] // size, pa.int64())}, schema=DUPS_SCHEMA)
    rio.write_bytes_atomic(dups_uri(dest, b), _parquet([dups], DUPS_SCHEMA))
    counts = np.unique(chunk, return_counts=True)
    return {int(c): int(n) for c, n in zip(*counts)}


def find_copies(dest: str, firsts: list[int], buckets: int, size: int, mapper: Mapper) -> dict[int, int]:
    """Chunks holding a copy of an id an earlier chunk stores, with how many (one task per bucket)."""
    out: dict[int, int] = {}
    for found in mapper(copies_in_bucket, [(dest, firsts, b, size) for b in range(buckets)]):
        for c, n in found.items():
            out[c] = out.get(c, 0) + n
    return out


def drop_copies(dest: str, first: int, end: int, buckets: int, size: int) -> list[tuple[int, int, str | None]]:
    """A task: rewrite the shards of chunks ``[first, end)`` that hold later copies without them, and name the
    chunk that owns each in their record; ``(chunk, rows, sha256)`` of each chunk changed."""
    owners: dict[int, dict[str, int]] = {}
    for b in range(buckets):
        with rio.open_exact(dups_uri(dest, b)) as fh:
            t = pq.read_table(fh)
        for c, i, o in zip(t.column("chunk").to_pylist(), t.column("id").to_pylist(), t.column("owner").to_pylist()):
            if first <= c < end:
                owners.setdefault(c, {})[i] = o
    out = []
    for c, own in sorted(owners.items()):
        record = read_record(dest, c)
        if record is None:
            raise DatasetError(f"staged chunk {c} under {dest} lost its record while its copies were dropped")
        if not (record.get("deduped") and record.get("owners") == {k: v for k, v in own.items()}):
            table = read_shard(rio.join(dest, record["shard"])) if record.get("shard") else None
            if table is not None:
                table = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(list(own), pa.string()))))
            record.update(owners=own, deduped=True)
            record = write_chunk(dest, c, record, table)
        out.append((c, record["rows"], record["sha256"]))
    return out
