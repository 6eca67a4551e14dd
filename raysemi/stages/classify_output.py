"""``raysemi predict``'s result files: predictions joined back to their paths, the failures, the summary.

    predictions.parquet / .csv   one row per good image, in listing order: id (sha256 of the image bytes),
                                 path, split (dataset sources), predicted (class name), confidence,
                                 prob_<class> for every class of the model
    failed.csv                   path, reason: every image that could not be read or decoded
    summary.json                 counts per class, low-confidence count, failures; written last

Exact copies (two paths, one content) share an id and its one prediction, and each path gets its row.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from raysemi import io as rio
from raysemi.data.shards import table_bytes
from raysemi.errors import RaysemiError

PREDICTIONS = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
FAILED = "failed.csv"
SUMMARY = "summary.json"
FINAL = (PREDICTIONS, PREDICTIONS_CSV, FAILED)  # SUMMARY comes after them


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
    return pa.table(cols)


def failed_rows(index: pa.Table) -> pa.Table:
    bad = index.filter(pc.is_null(index.column("id")))
    return pa.table({"path": bad.column("path"), "reason": bad.column("reason")})


def counts(table: pa.Table, failed: pa.Table, classes: list[str], min_confidence: float) -> dict:
    """The deterministic part of the summary: what a rerun or a retried actor must give again."""
    per = Counter(table.column("predicted").to_pylist())
    reasons = Counter(str(r).split(":")[0] for r in failed.column("reason").to_pylist())
    conf = table.column("confidence").to_numpy()
    return {
        "predicted": table.num_rows,
        "failed": failed.num_rows,
        "per_class": {c: per.get(c, 0) for c in classes},
        "min_confidence": min_confidence,
        "low_confidence": int((conf < min_confidence).sum()),
        "failed_reasons": dict(reasons.most_common()),
    }


def _csv(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pcsv.write_csv(table, buf)
    return buf.getvalue()


def write_results(out: str, table: pa.Table, failed: pa.Table, summary: dict) -> None:
    """Each file atomically, ``summary.json`` last: without it OUT holds no finished result."""
    rio.write_bytes_atomic(rio.join(out, PREDICTIONS), table_bytes(table))
    rio.write_bytes_atomic(rio.join(out, PREDICTIONS_CSV), _csv(table))
    rio.write_bytes_atomic(rio.join(out, FAILED), _csv(failed))
    rio.write_json(rio.join(out, SUMMARY), summary)


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
