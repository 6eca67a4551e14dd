"""The prediction-shard commit protocol: one Parquet file per input shard, committed by a marker written last.

    <out_uri>/part-NNNNN.parquet       id, pred (int16), confidence (float32), probs (list<float32>)
    <out_uri>/part-NNNNN.commit.json   {"model_sha256", "rows", "input", "input_sha256", "written"}, written last

``NNNNN`` is the input shard's index in the list given, so names are stable across runs. A shard counts as
done only when its marker names the same model file (sha256), the same input (its URI and the sha256 of its
content: an input swapped or re-ingested under the same name is recomputed, never trusted) and its Parquet
file holds that many rows. ``commit`` is idempotent: redoing a shard rewrites the same two files, never a second copy, so
a task retried after its actor died (even after its commit) is harmless. ``verify_exactly_once`` checks
the end state: every input row's id in exactly one prediction row.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from raysemi import io as rio
from raysemi.data.shards import read_shard, table_bytes
from raysemi.errors import RaysemiError
from raysemi.io import filesystem, join, write_bytes_atomic

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
    fs, path = filesystem(marker_uri(out_uri, index))
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_committed(out_uri: str, index: int, input_uri: str, rows: int, model_sha256: str,
                 input_sha256: str | None = None) -> bool:
    """Whether shard ``index`` is already predicted by this model from this input: marker and Parquet agree
    (and, when ``input_sha256`` is given, the marker names that content; a marker without it does not)."""
    marker = read_marker(out_uri, index)
    if not marker or marker.get("model_sha256") != model_sha256:
        return False
    if marker.get("input") != input_uri or marker.get("rows") != rows:
        return False
    if input_sha256 is not None and marker.get("input_sha256") != input_sha256:
        return False
    try:
        return rio.parquet_rows(part_uri(out_uri, index)) == rows
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return False


def commit(out_uri: str, index: int, input_uri: str, table: pa.Table, model_sha256: str,
           input_sha256: str | None = None) -> None:
    """Write the prediction shard atomically, then its marker (the commit) last."""
    write_bytes_atomic(part_uri(out_uri, index), table_bytes(table.cast(PRED_SCHEMA)))
    marker = {
        "model_sha256": model_sha256,
        "rows": table.num_rows,
        "input": input_uri,
        "input_sha256": input_sha256,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_bytes_atomic(marker_uri(out_uri, index), json.dumps(marker, indent=2).encode())


def pending_shards(
    out_uri: str, shard_uris: list[str], rows: list[int], model_sha256: str, input_sha256: list[str] | None = None
) -> list[tuple[int, str, int]]:
    """``(index, input uri, rows)`` of the shards not yet committed for this model (and, when
    ``input_sha256`` is given, for the inputs' current content)."""
    forget_listing(out_uri)
    hashes = input_sha256 if input_sha256 is not None else [None] * len(shard_uris)
    return [
        (i, u, r) for i, (u, r, h) in enumerate(zip(shard_uris, rows, hashes))
        if not is_committed(out_uri, i, u, r, model_sha256, h)
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
    for index in parts:
        marker = read_marker(out_uri, index)
        if marker is None or (model_sha256 is not None and marker.get("model_sha256") != model_sha256):
            continue
        tables.append(read_shard(part_uri(out_uri, index)).cast(PRED_SCHEMA))
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()


def verify_exactly_once(out_uri: str, shard_uris: list[str], input_rows: list[int] | None = None) -> int:
    """Check that the prediction shards hold each input row's id exactly once; returns the row count."""
    forget_listing(out_uri)
    pred_ids, in_ids = [], []
    for i, uri in enumerate(shard_uris):
        try:
            ids = read_shard(part_uri(out_uri, i), ["id"]).column("id")
        except (RaysemiError, FileNotFoundError):
            raise RaysemiError(f"exactly-once check failed: no prediction shard for {uri}") from None
        want = input_rows[i] if input_rows is not None else rio.parquet_rows(uri)
        if len(ids) != want:
            raise RaysemiError(
                f"exactly-once check failed: {part_uri(out_uri, i)} holds {len(ids)} rows, its input {uri} {want}"
            )
        pred_ids.append(ids)
        in_ids.append(read_shard(uri, ["id"]).column("id"))
    preds = pa.chunked_array([c for a in pred_ids for c in a.chunks], pa.string())
    inputs = pa.chunked_array([c for a in in_ids for c in a.chunks], pa.string())
    dup = len(preds) - pc.count_distinct(preds).as_py()
    if dup:
        raise RaysemiError(f"exactly-once check failed: {dup} ids have more than one prediction")
    missing = pc.sum(pc.invert(pc.is_in(inputs, value_set=preds))).as_py() or 0
    if missing:
        raise RaysemiError(f"exactly-once check failed: {missing} input rows have no prediction")
    return len(preds)


def remove_stale(out_uri: str, n: int) -> None:
    """Remove parts beyond the current input list (left by an earlier run over more shards)."""
    fs, _ = filesystem(out_uri)
    for index, files in part_files(out_uri).items():
        if index >= n:
            log.warning("removing stale prediction part %05d under %s", index, out_uri)
            for f in sorted(files, key=lambda p: not p.endswith(".json")):  # the marker first
                fs.rm(f)
    forget_listing(out_uri)
