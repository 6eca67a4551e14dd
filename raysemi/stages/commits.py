"""The prediction-shard commit protocol: one Parquet file per input shard, committed by a marker written last.

    <out_uri>/part-NNNNN.parquet       id, pred (int16), confidence (float32), probs (list<float32>)
    <out_uri>/part-NNNNN.commit.json   {"model_sha256", "rows", "input", "input_sha256", "written"}, written last

``NNNNN`` is the input shard's index in the list given, so names are stable across runs. A shard counts as
done only when its marker names the same model file (sha256), the same input (its URI and the sha256 of its
content: an input swapped or re-ingested under the same name is recomputed, never trusted) and its Parquet
file is there (written before the marker; the actor checked its ids against the input's before committing).
``commit`` is idempotent: redoing a shard rewrites the same two files, never a second copy, so
a task retried after its actor died (even after its commit) is harmless. ``verify_exactly_once`` checks
the end state from the markers: every input shard committed, its ids checked, its rows counted. On S3 that is
one listing and one marker read per shard, fetched concurrently.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone

import pyarrow as pa

from raysemi.core import io as rio
from raysemi.core.errors import RaysemiError
from raysemi.core.io import filesystem, join, write_bytes_atomic
from raysemi.data.shards import read_shard, table_bytes

log = logging.getLogger("raysemi.pseudolabel")

_PART = re.compile(r"part-(\d{5,})\.(parquet|commit\.json)$")

PRED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("pred", pa.int16(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
    ]
)


def part_uri(out_uri: str, index: int) -> str:
    return join(out_uri, f"part-{index:05d}.parquet")


def marker_uri(out_uri: str, index: int) -> str:
    return join(out_uri, f"part-{index:05d}.commit.json")


def read_marker(out_uri: str, index: int) -> dict | None:
    return read_markers(out_uri, [index]).get(index)


def read_markers(out_uri: str, indices: list[int]) -> dict[int, dict]:
    """The markers of parts ``indices`` that exist, fetched concurrently (one request each on S3)."""
    uris = {marker_uri(out_uri, i): i for i in indices}
    out = {}
    for uri, data in rio.read_small_files(list(uris)).items():
        try:
            out[uris[uri]] = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
            continue
    return out


def _matches(marker: dict | None, input_uri: str, rows: int, model_sha256: str, input_sha256: str | None) -> bool:
    if not marker or marker.get("model_sha256") != model_sha256:
        return False
    if marker.get("input") != input_uri or marker.get("rows") != rows:
        return False
    return input_sha256 is None or marker.get("input_sha256") == input_sha256


def is_committed(out_uri: str, index: int, input_uri: str, rows: int, model_sha256: str,
                 input_sha256: str | None = None) -> bool:
    """Whether shard ``index`` is already predicted by this model from this input: its Parquet file is there
    and its marker (written after it) names them (and, when ``input_sha256`` is given, that content)."""
    fs, path = filesystem(part_uri(out_uri, index))
    if not fs.exists(path):
        return False
    return _matches(read_marker(out_uri, index), input_uri, rows, model_sha256, input_sha256)


def commit(out_uri: str, index: int, input_uri: str, table: pa.Table, model_sha256: str,
           input_sha256: str | None = None, input_ids: pa.ChunkedArray | None = None) -> None:
    """Write the prediction shard atomically, then its marker (the commit) last. With ``input_ids`` (the
    input's ``id`` column) the shard's exactly-once check runs here first: its ids must be the input's, in
    order, and the marker says it passed (``ids_checked``)."""
    if input_ids is not None and not table.column("id").equals(input_ids):
        raise RaysemiError(f"exactly-once check failed: the predictions of {input_uri} do not hold its ids in order")
    write_bytes_atomic(part_uri(out_uri, index), table_bytes(table.cast(PRED_SCHEMA)))
    marker = {
        "model_sha256": model_sha256,
        "rows": table.num_rows,
        "input": input_uri,
        "input_sha256": input_sha256,
        "ids_checked": input_ids is not None,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_bytes_atomic(marker_uri(out_uri, index), json.dumps(marker, indent=2).encode())


def pending_shards(
    out_uri: str, shard_uris: list[str], rows: list[int], model_sha256: str, input_sha256: list[str] | None = None
) -> list[tuple[int, str, int]]:
    """``(index, input uri, rows)`` of the shards not yet committed for this model (and, when
    ``input_sha256`` is given, for the inputs' current content): one listing, the markers fetched together."""
    forget_listing(out_uri)
    hashes = input_sha256 if input_sha256 is not None else [None] * len(shard_uris)
    files = part_files(out_uri)
    present = [i for i in range(len(shard_uris)) if len(files.get(i, [])) == 2]
    markers = read_markers(out_uri, present)
    return [
        (i, u, r) for i, (u, r, h) in enumerate(zip(shard_uris, rows, hashes))
        if not _matches(markers.get(i), u, r, model_sha256, h)
    ]


def forget_listing(out_uri: str) -> None:
    """Drop fsspec's cached listing of ``out_uri``: the actors write there from other processes, so a listing
    cached by this process (s3fs keeps them) would hide their new files from ``open``."""
    fs, path = filesystem(out_uri)
    fs.invalidate_cache(path)


def part_files(out_uri: str) -> dict[int, list[str]]:
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
    parts = sorted(part_files(out_uri))
    forget_listing(out_uri)
    markers = read_markers(out_uri, parts)
    for index in parts:
        marker = markers.get(index)
        if marker is None or (model_sha256 is not None and marker.get("model_sha256") != model_sha256):
            continue
        tables.append(read_shard(part_uri(out_uri, index)).cast(PRED_SCHEMA))
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()


def verify_exactly_once(out_uri: str, shard_uris: list[str], input_rows: list[int] | None = None) -> int:
    """Check, from the markers alone, that every input shard has its prediction shard, committed with the
    shard's exactly-once check passed and its row count; returns the row count. (Ids are unique across a
    dataset's shards, so a shard-by-shard check covers the whole.)"""
    forget_listing(out_uri)
    files = part_files(out_uri)
    markers = read_markers(out_uri, [i for i in range(len(shard_uris)) if len(files.get(i, [])) == 2])
    total = 0
    for i, uri in enumerate(shard_uris):
        marker = markers.get(i)
        if marker is None or marker.get("input") != uri:
            raise RaysemiError(f"exactly-once check failed: no prediction shard for {uri}")
        want = input_rows[i] if input_rows is not None else rio.parquet_rows(uri)
        if marker.get("rows") != want:
            raise RaysemiError(
                f"exactly-once check failed: {part_uri(out_uri, i)} holds {marker.get('rows')} rows, its input {uri} {want}"
            )
        if not marker.get("ids_checked"):
            raise RaysemiError(f"exactly-once check failed: {part_uri(out_uri, i)} was committed without its id check")
        total += want
    return total


def remove_stale(out_uri: str, n: int) -> None:
    """Remove parts beyond the current input list (left by an earlier run over more shards)."""
    fs, _ = filesystem(out_uri)
    for index, files in part_files(out_uri).items():
        if index >= n:
            log.warning("removing stale prediction part %05d under %s", index, out_uri)
            for f in sorted(files, key=lambda p: not p.endswith(".json")):  # the marker first
                fs.rm(f)
    forget_listing(out_uri)
