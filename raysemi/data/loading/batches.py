"""The loader's row stream: shard tables read ahead, cut into raw batches (images still encoded).

A ``RawBatch`` is a ``pyarrow.Table`` of one batch's rows, normalised so that both backends read the same
columns: ``image`` (encoded bytes), ``label`` (int64, -1 = none), ``weight`` (float32, 1 when the shard has
none), ``id`` when asked for, and the extra columns asked for.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysemi.core.io import filesystem, parquet_rows
from raysemi.data.shards import DatasetError


@dataclass
class RawBatch:
    """One batch before decoding: what the loader feeds to a backend."""

    rows: pa.Table
    seed: int  # seeds the torch backend's random transforms of this batch (reproducible per batch)
    # Per row, its decoded pixels when the loader keeps them (``decoded_cache``), else None; the ``image``
    # column may then be absent (every row's pixels are here).
    pixels: list[np.ndarray | None] | None = None

    def side(self) -> RawBatch:
        """The same batch without its images (what travels beside the decoded tensors)."""
        return RawBatch(self.rows.drop_columns([c for c in ("image",) if c in self.rows.column_names]), self.seed)

    def images(self) -> list[bytes]:
        return self.rows.column("image").to_pylist()


def read_rows(uri: str, columns: Sequence[str], extra: Sequence[str] = ()) -> pa.Table:
    """Read one shard's ``image`` plus those of ``columns`` it has (``label``, ``weight``, ``id``) and the
    required ``extra`` columns, normalised as the module docstring says."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            need = ["image", *extra] + (["id"] if "id" in columns else [])
            missing = [c for c in need if c not in names]
            if missing:
                raise DatasetError(f"shard {uri} has no column {', '.join(missing)}")
            wanted = list(dict.fromkeys(["image", *[c for c in columns if c in names], *extra]))
            table = pf.read(columns=wanted)
    except FileNotFoundError:
        raise DatasetError(f"shard {uri} is missing") from None
    n = table.num_rows
    labels = (
        pc.fill_null(table.column("label"), -1).cast(pa.int64())
        if "label" in table.column_names
        else pa.array(np.full(n, -1, dtype=np.int64))
    )
    weights = (
        pc.fill_null(table.column("weight").cast(pa.float32()), 1.0)
        if "weight" in table.column_names
        else pa.array(np.ones(n, dtype=np.float32))
    )
    cols = {"image": table.column("image"), "label": labels, "weight": weights}
    if "id" in columns:
        cols["id"] = table.column("id")
    cols.update({k: table.column(k) for k in extra})
    return pa.table(cols)


def concat(a: pa.Table | None, b: pa.Table) -> pa.Table:
    """``a`` then ``b`` (``a`` may be None: nothing pending yet)."""
    return b if a is None or a.num_rows == 0 else pa.concat_tables([a, b])


def take(table: pa.Table, idx: np.ndarray) -> pa.Table:
    """Rows ``idx`` as a compact copy (a slice would keep, and pickle, its whole shard's buffers)."""
    return table.take(pa.array(np.asarray(idx, dtype=np.int64)))


def shard_row_counts(uris: Sequence[str]) -> list[int]:
    """Row counts from the Parquet footers (when the manifest's counts are not at hand)."""
    counts = []
    for uri in uris:
        try:
            counts.append(parquet_rows(uri))
        except FileNotFoundError:
            raise DatasetError(f"shard {uri} is missing") from None
    return counts


def read_ahead(uris: Sequence[str], read) -> Iterator[Any]:
    """``read(uri)`` for each uri in order, the next one read in a background thread meanwhile."""
    if not uris:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysemi-shard")
    try:
        future = pool.submit(read, uris[0])
        for i in range(len(uris)):
            current = future.result()
            if i + 1 < len(uris):
                future = pool.submit(read, uris[i + 1])
            yield current
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def in_background(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` produced by a thread of their own, up to ``depth`` ahead of the consumer.

    The thread starts at once, not at the first ``next()``: a training stage calls this before it builds
    its model, so the decoders' start-up (a DALI pipeline, the first shard read) overlaps that instead of
    showing up as data wait in the first steps. Every call into ``items`` happens on that one thread. An
    exception there is raised here, in order; closing the returned generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((done, err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="raysemi-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator[Any]:
        try:
            while True:
                item, err = q.get()
                if item is done:
                    if err is not None:
                        raise err
                    return
                yield item
        finally:
            stop.set()
            thread.join(timeout=30)

    return consume()


def batch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
