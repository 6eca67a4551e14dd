"""Writing the planned shards: each one's table from its items (bytes re-read and checked), a few at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa

from raysemi import console
from raysemi import io as rio
from raysemi.data import shards
from raysemi.data.shards import DatasetError, ShardInfo
from raysemi.data.sources import Item
from raysemi.data.validate import encode_array


def read_item(it: Item) -> bytes:
    if it.path is not None:
        return it.path.read_bytes()
    return encode_array(it.array)


def shard_table(rows: list[Item], class_index: dict[str, int], tags: tuple[str, ...] = ()) -> pa.Table:
    images = []
    for it in rows:
        if it.keep is not None:
            images.append(it.keep)
            continue
        data = read_item(it)
        if shards.image_id(data) != it.sha:
            raise DatasetError(f"{it.path} changed during ingest; run it again")
        images.append(data)
    return pa.table(
        {
            "id": [it.sha for it in rows],
            "image": images,
            "label": pa.array(
                [None if it.label is None else class_index[it.label] for it in rows], pa.int16()
            ),
            "group": pa.array([it.group for it in rows], pa.string()),
            "source": [it.source for it in rows],
            # DICOM tags the user chose to keep (vetted by dicom.check_keep_tags): extra string columns
            **{t: pa.array([it.dicom.tags.get(t) if it.dicom else None for it in rows], pa.string()) for t in tags},
        },
        schema=pa.schema([*shards.SCHEMA, *(pa.field(t, pa.string()) for t in tags)]),
    )


def progress_bar(total: int, desc: str, progress: bool):
    """A bar on a terminal, plain lines in a log (``raysemi.console.progress``), nothing when not ``progress``."""
    return console.progress(total, desc, unit="img", enabled=progress)


def write_shards(
    dest: str, plan: list, class_index: dict[str, int], progress: bool, tags: tuple[str, ...] = ()
) -> dict[tuple[str, int], ShardInfo]:
    """Write every planned shard (a few at a time); on any failure cancel the rest and re-raise."""
    written: dict[tuple[str, int], ShardInfo] = {}
    lock = threading.Lock()

    def one(split: str, i: int, rows: list[Item]) -> int:
        info = shards.write_shard(dest, f"{split}/part-{i:05d}.parquet", shard_table(rows, class_index, tags))
        with lock:
            written[(split, i)] = info
        return len(rows)

    with (
        ThreadPoolExecutor(4 if rio.is_remote(dest) else 2) as pool,
        progress_bar(sum(len(p[2]) for p in plan), "write", progress) as bar,
    ):
        futures = [pool.submit(one, *p) for p in plan]
        try:
            for f in as_completed(futures):
                bar.update(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise  # leaving the with-block waits for the shards in flight, so cleanup sees them all
    return written
