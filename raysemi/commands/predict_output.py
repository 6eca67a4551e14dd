"""``raysemi predict``'s result files: predictions joined back to their paths, the failures, the summary.

    predictions.parquet / .csv   one row per good image, in listing order: id (sha256 of the image bytes),
                                 path, split (dataset sources), predicted (class name), confidence,
                                 prob_<class> for every class of the model
    failed.csv                   path, reason: every image that could not be read or decoded
    summary.json                 counts per class, low-confidence count, failures; written last

The join runs in tasks, one per group of staged chunks (or of dataset shards): each reads its chunks' records
(path, id, reason), the prediction parts of their shards and of the chunks that store their exact copies, joins
them (``prediction_rows``) and writes its rows to ``OUT/results/``, returning its counts. The driver then
streams those parts, in order, into the result files (a Parquet and a CSV writer over record batches) and sums
the counts: it holds one part at a time and never the whole table. Exact copies (two paths, one content) share an
id and its one prediction, and each path gets its row.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from raysemi.core import io as rio
from raysemi.core.errors import RaysemiError
from raysemi.data.inputs.chunks import read_record
from raysemi.data.shards import read_shard
from raysemi.stages.commits import PRED_SCHEMA, part_uri

PREDICTIONS = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
FAILED = "failed.csv"
SUMMARY = "summary.json"
RESULTS = "results"  # the tasks' parts, removed once the result files are written
FINAL = (PREDICTIONS, PREDICTIONS_CSV, FAILED)  # SUMMARY comes after them
INDEX_SCHEMA = pa.schema([pa.field("path", pa.string()), pa.field("id", pa.string()), pa.field("reason", pa.string())])
FAILED_SCHEMA = pa.schema([pa.field("path", pa.string()), pa.field("reason", pa.string())])


def result_schema(classes: list[str], split: bool) -> pa.Schema:
    names = ["id", "path", *(["split"] if split else []), "predicted"]
    return pa.schema([*(pa.field(n, pa.string()) for n in names), pa.field("confidence", pa.float32()),
                      *(pa.field(f"prob_{c}", pa.float32()) for c in classes)])


def prediction_rows(index: pa.Table, preds: pa.Table, classes: list[str]) -> pa.Table:
    """The rows of ``index`` (path, id, reason[, split]) that have an id, with their prediction."""
    ok = index.filter(pc.is_valid(index.column("id")))
    pos = pc.index_in(ok.column("id"), value_set=preds.column("id").combine_chunks())
    if pos.null_count:
        raise RaysemiError(f"{pos.null_count} staged images have no prediction: rerun with --resume")
    p = preds.take(pos)
    n, k = p.num_rows, len(classes)
    probs = p.column("probs").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, k)
    names = np.asarray(classes, dtype=object)[p.column("pred").to_numpy().astype(np.int64)]
    cols = {"id": ok.column("id"), "path": ok.column("path")}
    if "split" in ok.column_names:
        cols["split"] = ok.column("split")
    cols["predicted"] = pa.array(names.tolist(), pa.string())
    cols["confidence"] = p.column("confidence")
    cols.update({f"prob_{c}": pa.array(probs[:, j], pa.float32()) for j, c in enumerate(classes)})
    return pa.table(cols).cast(result_schema(classes, "split" in ok.column_names))


def failed_rows(index: pa.Table) -> pa.Table:
    bad = index.filter(pc.is_null(index.column("id")))
    return pa.table({"path": bad.column("path"), "reason": bad.column("reason")}, schema=FAILED_SCHEMA)


def partial_counts(table: pa.Table, failed: pa.Table, classes: list[str], min_confidence: float) -> dict:
    """One part's counts; ``merge_counts`` sums them into the summary's."""
    per = Counter(table.column("predicted").to_pylist())
    reasons = Counter(str(r).split(":")[0] for r in failed.column("reason").to_pylist())
    return {"predicted": table.num_rows, "failed": failed.num_rows, "per_class": [per.get(c, 0) for c in classes],
            "low_confidence": int((table.column("confidence").to_numpy() < min_confidence).sum()),
            "failed_reasons": list(reasons.items())}  # in order of first appearance: ties keep it


def merge_counts(parts: list[dict], classes: list[str], min_confidence: float) -> dict:
    """The deterministic part of the summary: what a rerun or a retried actor must give again."""
    reasons: Counter = Counter()
    for p in parts:
        reasons.update(dict(p["failed_reasons"]))
    return {
        "predicted": sum(p["predicted"] for p in parts),
        "failed": sum(p["failed"] for p in parts),
        "per_class": {c: sum(p["per_class"][j] for p in parts) for j, c in enumerate(classes)},
        "min_confidence": min_confidence,
        "low_confidence": sum(p["low_confidence"] for p in parts),
        "failed_reasons": dict(reasons.most_common()),
    }


def rows_uri(out: str, g: int) -> str:
    return rio.join(out, RESULTS, f"rows-{g:05d}.parquet")


def failed_uri(out: str, g: int) -> str:
    return rio.join(out, RESULTS, f"failed-{g:05d}.parquet")


def _finish(out: str, g: int, index: pa.Table, preds: pa.Table, classes: list[str], min_confidence: float) -> dict:
    table, failed = prediction_rows(index, preds, classes), failed_rows(index)
    for uri, t in ((rows_uri(out, g), table), (failed_uri(out, g), failed)):
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd")
        rio.write_bytes_atomic(uri, buf.getvalue())
    return partial_counts(table, failed, classes, min_confidence)


def _parts(pred_out: str, parts: set[int]) -> pa.Table:
    tables = [read_shard(part_uri(pred_out, p)).cast(PRED_SCHEMA) for p in sorted(parts)]
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()


def staged_results(out: str, dest: str, pred_out: str, first: int, end: int, classes: list[str],
                   min_confidence: float, g: int) -> dict:
    """A task: the result rows of staged chunks ``[first, end)`` (part ``g``); returns their counts."""
    part_of = np.load(io.BytesIO(rio.read_bytes(rio.join(dest, "parts.npy"))))
    cols: dict[str, list] = {"path": [], "id": [], "reason": []}
    need = set()
    for c in range(first, end):
        record = read_record(dest, c)
        if record is None:
            raise RaysemiError(f"staged chunk {c} lost its record: rerun with --resume")
        cols["path"] += record["paths"]
        cols["id"] += record["ids"]
        cols["reason"] += record["reasons"]
        need.update(int(part_of[o]) for o in [c, *record["owners"].values()] if part_of[o] >= 0)
    return _finish(out, g, pa.table(cols, schema=INDEX_SCHEMA), _parts(pred_out, need), classes, min_confidence)


def dataset_results(out: str, shards: list[tuple[int, str, str]], pred_out: str, classes: list[str],
                    min_confidence: float, g: int) -> dict:
    """A task: the result rows of dataset shards ``(index, split, uri)`` (part ``g``); returns their counts."""
    parts = []
    for _, split, uri in shards:
        t = read_shard(uri, ["id", "source"])
        parts.append(pa.table({"path": t.column("source"), "id": t.column("id"),
                               "reason": pa.nulls(t.num_rows, pa.string()),
                               "split": pa.array([split] * t.num_rows, pa.string())}))
    return _finish(out, g, pa.concat_tables(parts), _parts(pred_out, {i for i, _, _ in shards}), classes,
                   min_confidence)


@contextmanager
def open_atomic(uri: str) -> Iterator:
    """A file to stream into that appears at ``uri`` whole or not at all: a temporary moved into place
    locally; on an object store one multipart upload, completed on success and aborted on error."""
    fs, path = rio.filesystem(uri)
    if rio.is_remote(uri):
        fh = fs.open(path, "wb")
        try:
            yield fh
        except BaseException:
            fh.discard()
            raise
        fh.close()
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-stream"
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _batches(uri: str) -> Iterator[pa.RecordBatch]:
    """A part's rows, a batch at a time (the tasks wrote them in the result schema)."""
    with rio.open_exact(uri) as fh:
        yield from pq.ParquetFile(fh).iter_batches(batch_size=8192)


def write_results(out: str, groups: int, schema: pa.Schema, summary: dict) -> None:
    """Stream the tasks' parts into the result files, in order, each file atomically; ``summary.json`` last:
    without it OUT holds no finished result. Then the parts are removed."""
    with (
        open_atomic(rio.join(out, PREDICTIONS)) as pq_fh, open_atomic(rio.join(out, PREDICTIONS_CSV)) as csv_fh,
        pq.ParquetWriter(pq_fh, schema, compression="zstd") as pw, pcsv.CSVWriter(csv_fh, schema) as cw,
    ):
        for g in range(groups):
            for batch in _batches(rows_uri(out, g)):
                if batch.num_rows:
                    pw.write_batch(batch)
                    cw.write_batch(batch)
    with open_atomic(rio.join(out, FAILED)) as fh, pcsv.CSVWriter(fh, FAILED_SCHEMA) as cw:
        for g in range(groups):
            for batch in _batches(failed_uri(out, g)):
                if batch.num_rows:
                    cw.write_batch(batch)
    rio.write_json(rio.join(out, SUMMARY), summary)
    fs, path = rio.filesystem(rio.join(out, RESULTS))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def summary_text(summary: dict, out: str) -> str:
    """A few lines for the CLI."""
    shards = summary["run"]["shards"]
    lines = [
        f"{summary['predicted']:,} images predicted by {summary['model']} "
        f"({shards['computed']} shards computed, {shards['reused']} reused)"
    ]
    width = max((len(c) for c in summary["per_class"]), default=0)
    lines += [f"  {c:<{width}} {n:>8,}" for c, n in summary["per_class"].items()]
    lines.append(f"low confidence (< {summary['min_confidence']:g}): {summary['low_confidence']:,}")
    detail = "; ".join(f"{r}: {n}" for r, n in summary["failed_reasons"].items())
    lines.append(f"failed: {summary['failed']:,}" + (f" ({detail}; see {rio.join(out, FAILED)})" if detail else ""))
    if summary.get("ignored"):
        lines.append(f"ignored: {summary['ignored']:,} files that are not images by their extension")
    lines.append(f"predictions: {rio.join(out, PREDICTIONS)} and {rio.join(out, PREDICTIONS_CSV)}")
    return "\n".join(lines)
