"""Staging listed images for prediction: read and validate each once, write Parquet shards of the good ones.

``stage_images`` cuts the listing into fixed chunks of ``rows_per_shard(n)`` images (so chunk ``c`` holds
the same paths on every run) and, chunk by chunk, reads each image (threads: S3 latency, and Pillow decodes
without the GIL), validates it with ingest's ``check_image`` (what fails gets its reason, never an error) and
writes the good ones as ``<dest>/part-CCCCC.parquet`` in the data contract's schema (``id`` = sha256 of the
bytes, ``source`` = the path shown). Then the chunk's record, written last, commits it::

    <dest>/chunk-CCCCC.json   {"paths", "ids" (null: failed), "reasons", "shard" (null: no row), "rows"}

A rerun reuses every committed chunk whose paths are the same (a killed driver loses at most the chunk it
was staging). Exact copies are stored once (the first path's chunk) so every stored id is unique, as the
prediction commits require; each path still gets its prediction through its id.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from raysemi import io as rio
from raysemi.data import shards
from raysemi.data.image_inputs import ImageRef
from raysemi.data.shard_writer import progress_bar
from raysemi.data.validate import DEFAULT_MAX_PIXELS, check_image

MAX_ROWS = 256  # images per staged shard at most (a shard is one actor task, held in memory while staged)
MIN_SHARDS = 16  # below MAX_ROWS x MIN_SHARDS images, shards shrink so that every actor gets work

INDEX_SCHEMA = pa.schema(
    [pa.field("path", pa.string(), nullable=False), pa.field("id", pa.string()), pa.field("reason", pa.string())]
)


def rows_per_shard(n: int) -> int:
    return max(1, min(MAX_ROWS, math.ceil(n / MIN_SHARDS)))


def chunk_uri(dest: str, c: int) -> str:
    return rio.join(dest, f"chunk-{c:05d}.json")


@dataclass
class Staged:
    shard_uris: list[str]  # the non-empty staged shards, in listing order
    index: pa.Table  # INDEX_SCHEMA: one row per listed image, in listing order
    chunks: int
    reused: int  # chunks committed by an earlier run and reused


def _check(ref: ImageRef, max_pixels: int) -> tuple[str | None, bytes | None, str | None]:
    """(id, bytes to store, None) for a good image, (None, None, reason) for a bad one."""
    try:
        data = rio.read_bytes(ref.uri)
    except FileNotFoundError:
        return None, None, "not found"
    except (OSError, ValueError) as err:
        return None, None, f"unreadable: {type(err).__name__}"
    checked = check_image(data, max_pixels=max_pixels)
    if not checked.ok:
        return None, None, checked.reason
    return shards.image_id(data), checked.data, None


def _reusable(dest: str, c: int, paths: list[str]) -> dict | None:
    try:
        record = rio.read_json(chunk_uri(dest, c))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if record.get("paths") != paths:
        return None
    if record.get("shard") is not None:
        try:
            if rio.parquet_rows(rio.join(dest, record["shard"])) != record.get("rows"):
                return None
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            return None
    return record


def _stage_chunk(dest: str, c: int, refs: list[ImageRef], seen: set[str], pool, max_pixels: int) -> dict:
    ids, reasons, rows = [], [], {"id": [], "image": [], "source": []}
    for ref, (sha, data, reason) in zip(refs, pool.map(lambda r: _check(r, max_pixels), refs)):
        ids.append(sha)
        reasons.append(reason)
        if sha is not None and sha not in seen:
            seen.add(sha)
            rows["id"].append(sha)
            rows["image"].append(data)
            rows["source"].append(ref.path)
    name = None
    if rows["id"]:
        n = len(rows["id"])
        name = f"part-{c:05d}.parquet"
        table = pa.table(
            {**rows, "label": pa.nulls(n, pa.int16()), "group": pa.nulls(n, pa.string())}
        ).select(shards.SCHEMA.names)
        shards.write_shard(dest, name, table)
    record = {"paths": [r.path for r in refs], "ids": ids, "reasons": reasons, "shard": name, "rows": len(rows["id"])}
    rio.write_json(chunk_uri(dest, c), record)  # last: the chunk's commit
    return record


def stage_images(
    images: list[ImageRef], dest: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
    progress: bool = True,
) -> Staged:
    """Stage ``images`` under ``dest`` (see the module docstring), reusing chunks committed earlier."""
    size = rows_per_shard(len(images))
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    seen: set[str] = set()
    records, reused = [], 0
    with (
        ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 2) * 2)) as pool,
        progress_bar(len(images), "stage", progress) as bar,
    ):
        for c, refs in enumerate(chunks):
            record = _reusable(dest, c, [r.path for r in refs])
            if record is None:
                record = _stage_chunk(dest, c, refs, seen, pool, max_pixels)
            else:
                reused += 1
                seen.update(i for i in record["ids"] if i is not None)
            records.append(record)
            bar.update(len(refs))
    index = pa.table(
        {
            "path": [p for r in records for p in r["paths"]],
            "id": [i for r in records for i in r["ids"]],
            "reason": [x for r in records for x in r["reasons"]],
        },
        schema=INDEX_SCHEMA,
    )
    uris = [rio.join(dest, r["shard"]) for r in records if r["shard"] is not None]
    return Staged(uris, index, len(chunks), reused)
