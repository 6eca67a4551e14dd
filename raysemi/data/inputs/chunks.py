"""A staged chunk of ``raysemi predict``'s inputs: its record (``chunk-CCCCC.json``: paths, ids, reasons, owners of
exact copies, the shard's rows and sha256) and its shard, written shard first and record last (the record is the
chunk's commit). Shared by the staging tasks (``staging.py``), the exact-copy tasks (``dedup.py``) and the
results (``commands/predict_output.py``).
"""

from __future__ import annotations

import json

import pyarrow as pa

from raysemi.core import io as rio
from raysemi.data import shards


def chunk_uri(dest: str, c: int) -> str:
    """Where chunk ``c``'s record lies under ``dest``."""
    return rio.join(dest, f"chunk-{c:05d}.json")


def read_record(dest: str, c: int) -> dict | None:
    """Chunk ``c``'s record, or None when it was never committed (or is unreadable)."""
    try:
        return rio.read_json(chunk_uri(dest, c))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_chunk(dest: str, c: int, record: dict, table: pa.Table | None) -> dict:
    """The chunk's shard (or none, and an earlier one removed), then its record: the commit."""
    name = f"part-{c:05d}.parquet"
    record.update(shard=None, rows=0, sha256=None)
    if table is not None and table.num_rows:
        info = shards.write_shard(dest, name, table)
        record.update(shard=name, rows=info.rows, sha256=info.sha256)
    else:
        fs, path = rio.filesystem(rio.join(dest, name))
        if fs.exists(path):
            fs.rm(path)
    rio.write_json(chunk_uri(dest, c), record)  # last: the chunk's commit
    return record
