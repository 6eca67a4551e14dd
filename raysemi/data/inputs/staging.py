"""Staging listed images for prediction, in tasks: read and validate each once, write Parquet shards of the good.

The listing (``listing.stream_listing``: Parquet parts under ``dest``) is cut into fixed chunks of
``rows_per_shard(n)`` images (chunk ``c`` holds the same paths on every run). A task stages a group of
consecutive chunks (``GROUP_ROWS`` images): it reads its rows of the listing, reads each image (threads: S3
latency, and Pillow decodes without the GIL), validates it with ingest's ``check_image`` (what fails gets its
reason, never an error) and writes the chunk's good images as ``<dest>/part-CCCCC.parquet`` in the data
contract's schema (``id`` = sha256 of the bytes, ``source`` = the path shown), each id once within the chunk.
Then the chunk's record, written last, commits it::

    <dest>/chunk-CCCCC.json   {"paths", "ids" (null: failed), "reasons", "shard" (null: no row), "rows",
                               "sha256" (the shard file's), "owners" ({id: earlier chunk}), "deduped"}

A rerun reuses every committed chunk whose paths are the same. The driver sees one summary per chunk.

**Exact copies across chunks** are stored once, in the chunk of their first path, so that every stored id is
unique (the prediction commits rely on it), without any process holding every id (``dedup.py``): each
staging task also writes its chunks' ids (the first of each in its chunk) with their listing positions,
sorted by id and cut into row groups by id prefix (``keys-GGGGG.parquet``); one task per id-prefix bucket reads
that bucket's row group of every key file and finds the ids seen in more than one chunk; the chunks that hold a
later copy then have their shard rewritten without it (a copy is rare: one rewrite of one small shard), and
their record names the chunk that owns each dropped id (``owners``), where the output finds its prediction.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from raysemi.core import console
from raysemi.core import io as rio
from raysemi.data import shards
from raysemi.data.ingest.validate import DEFAULT_MAX_PIXELS, check_image
from raysemi.data.inputs.chunks import read_record, write_chunk
from raysemi.data.inputs.dedup import drop_copies, find_copies, write_keys
from raysemi.data.inputs.listing import ImageRef, Listing, listing_rows
from raysemi.data.shards import Mapper, local_map

MAX_ROWS = 256  # images per staged shard at most (a shard is one actor task, held in memory while staged)
MIN_SHARDS = 16  # below MAX_ROWS x MIN_SHARDS images, shards shrink so that every actor gets work
GROUP_ROWS = 8_192  # images per staging task at most (its chunks are staged one after another)
BUCKET_ROWS = 500_000  # ids per dedup task at most (about 64 MB of keys)
MAP_TASKS = 64  # tasks per call of the mapper: bounds the work in flight, and the progress bar moves


def rows_per_shard(n: int) -> int:
    return max(1, min(MAX_ROWS, math.ceil(n / MIN_SHARDS)))


@dataclass
class Staged:
    """The driver's view of the staged inputs: one small summary per chunk, no per-image list."""

    dest: str
    size: int  # images per chunk
    rows: int  # images listed
    chunk_rows: list[int]  # images stored in each chunk's shard (0: none)
    chunk_sha256: list[str | None]  # each chunk's shard file's sha256
    reused: int  # chunks committed by an earlier run and reused
    copies: int  # images stored by an earlier chunk (exact copies across chunks)

    @property
    def chunks(self) -> int:
        return len(self.chunk_rows)

    @property
    def groups(self) -> list[tuple[int, int]]:
        """``(first, end)`` chunk ranges, one per staging (and output) task."""
        per = max(1, GROUP_ROWS // self.size)
        return [(g, min(g + per, self.chunks)) for g in range(0, self.chunks, per)]

    @property
    def shard_uris(self) -> list[str]:
        return [rio.join(self.dest, f"part-{c:05d}.parquet") for c, n in enumerate(self.chunk_rows) if n]

    @property
    def shard_rows(self) -> list[int]:
        return [n for n in self.chunk_rows if n]

    @property
    def shard_hashes(self) -> list[str]:
        return [h for n, h in zip(self.chunk_rows, self.chunk_sha256) if n]

    def part_of(self) -> list[int]:
        """The prediction part of each chunk (its index among the non-empty shards; -1: none)."""
        out, k = [], 0
        for n in self.chunk_rows:
            out.append(k if n else -1)
            k += bool(n)
        return out


def map_batched(mapper: Mapper, fn, args: list[tuple], bar=None, weights: list[int] | None = None) -> list:
    """``mapper(fn, args)`` in calls of ``MAP_TASKS``: a bounded number of tasks in flight, and progress."""
    out = []
    for i in range(0, len(args), MAP_TASKS):
        out += mapper(fn, args[i : i + MAP_TASKS])
        if bar is not None:
            bar.update(sum(weights[i : i + MAP_TASKS]) if weights else len(args[i : i + MAP_TASKS]))
    return out


def read_image(uri: str) -> bytes:
    return rio.read_bytes(uri)


def _check(ref: ImageRef, max_pixels: int) -> tuple[str | None, bytes | None, str | None]:
    """(id, bytes to store, None) for a good image, (None, None, reason) for a bad one."""
    try:
        data = read_image(ref.uri)
    except FileNotFoundError:
        return None, None, "not found"
    except (OSError, ValueError) as err:
        return None, None, f"unreadable: {type(err).__name__}"
    checked = check_image(data, max_pixels=max_pixels)
    if not checked.ok:
        return None, None, checked.reason
    return shards.image_id(data), checked.data, None


def _reusable(dest: str, c: int, paths: list[str]) -> dict | None:
    record = read_record(dest, c)
    if record is None or record.get("paths") != paths:
        return None
    if record.get("shard") is not None:
        try:
            if rio.parquet_rows(rio.join(dest, record["shard"])) != record.get("rows"):
                return None
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            return None
    return record


def _stage_chunk(dest: str, c: int, refs: list[ImageRef], pool, max_pixels: int) -> dict:
    ids, reasons, rows, seen = [], [], {"id": [], "image": [], "source": []}, set()
    for ref, (sha, data, reason) in zip(refs, pool.map(lambda r: _check(r, max_pixels), refs)):
        ids.append(sha)
        reasons.append(reason)
        if sha is not None and sha not in seen:  # an exact copy within the chunk: stored once
            seen.add(sha)
            rows["id"].append(sha)
            rows["image"].append(data)
            rows["source"].append(ref.path)
    n = len(rows["id"])
    table = pa.table(
        {**rows, "label": pa.nulls(n, pa.int16()), "group": pa.nulls(n, pa.string())}
    ).select(shards.SCHEMA.names)
    record = {"paths": [r.path for r in refs], "ids": ids, "reasons": reasons, "owners": {}, "deduped": False}
    return write_chunk(dest, c, record, table)


def stage_group(dest: str, size: int, rows: int, first: int, end: int, buckets: int, max_pixels: int,
                workers: int) -> list[tuple[int, str | None, bool]]:
    """Stage chunks ``[first, end)`` (a task) and write their key file; ``(rows, sha256, reused)`` per chunk."""
    table = listing_rows(dest, first * size, min(end * size, rows))
    paths, uris = table.column("path").to_pylist(), table.column("uri").to_pylist()
    out, keys = [], []
    with ThreadPoolExecutor(workers) as pool:
        for c in range(first, end):
            lo, hi = (c - first) * size, min((c - first + 1) * size, len(paths))
            record = _reusable(dest, c, paths[lo:hi])
            reused = record is not None
            if record is None:
                refs = [ImageRef(p, u) for p, u in zip(paths[lo:hi], uris[lo:hi])]
                record = _stage_chunk(dest, c, refs, pool, max_pixels)
            out.append((record["rows"], record["sha256"], reused))
            firsts: dict[str, int] = {}
            for i, sha in enumerate(record["ids"]):
                if sha is not None and sha not in firsts:
                    firsts[sha] = c * size + i
            keys.append(firsts)
    write_keys(dest, first, keys, buckets)
    return out


def stage_listing(
    listing: Listing, *, mapper: Mapper = local_map, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
    workers: int | None = None,
) -> Staged:
    """Stage the streamed ``listing`` under its ``dest`` (see the module docstring), reusing chunks committed
    earlier; ``mapper`` runs the tasks (``ray_tasks.task_mapper`` on a cluster, ``local_map`` in one process)."""
    n, dest = listing.rows, listing.dest
    size = rows_per_shard(n)
    staged = Staged(dest, size, n, [], [], 0, 0)
    chunks = math.ceil(n / size)
    staged.chunk_rows = [0] * chunks  # so that ``groups`` knows the chunk count
    buckets = max(1, math.ceil(n / BUCKET_ROWS))
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    groups = staged.groups
    args = [(dest, size, n, a, b, buckets, max_pixels, workers) for a, b in groups]
    weights = [min(b * size, n) - a * size for a, b in groups]
    bar = console.progress(n, "stage", "img", progress)
    try:
        results = map_batched(mapper, stage_group, args, bar, weights)
    finally:
        bar.close()
    flat = [r for group in results for r in group]
    staged.chunk_rows = [r for r, _, _ in flat]
    staged.chunk_sha256 = [h for _, h, _ in flat]
    staged.reused = sum(reused for _, _, reused in flat)
    # exact copies across chunks: per-chunk counts of the ids an earlier chunk stores
    later = find_copies(dest, [a for a, _ in groups], buckets, size, mapper)
    if later:
        staged.copies = sum(later.values())
        per = max(1, GROUP_ROWS // size)
        todo = sorted({c // per for c in later})
        fixed = mapper(drop_copies, [(dest, groups[g][0], groups[g][1], buckets, size) for g in todo])
        for c, rows_, sha in (x for part in fixed for x in part):
            staged.chunk_rows[c], staged.chunk_sha256[c] = rows_, sha
    return staged
