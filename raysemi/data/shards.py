"""The dataset contract: Parquet shards + ``manifest.json``, on a local path or ``s3://bucket/prefix``.

A dataset is ``<root>/manifest.json`` and ``<root>/<split>/part-NNNNN.parquet``. Shards are written under
a temporary name and renamed; the manifest is written last, so a folder without a manifest is never
mistaken for a dataset. Every path is a URI and goes through ``raysemi.core.io`` (fsspec; s3fs for ``s3://``), so the same code
reads and writes both.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysemi.core.errors import RaysemiError
from raysemi.core.io import filesystem, join, open_exact, storage_errors, write_bytes_atomic

FORMAT_VERSION = 2  # 2: the quarantine list moved to quarantine.parquet, its counts by reason stay here
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"  # beside the manifest: source, reason of every input not stored
QUARANTINE_SCHEMA = pa.schema([pa.field("source", pa.string()), pa.field("reason", pa.string())])
SPLITS = ("train", "val", "test", "unlabeled")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int16(), nullable=True),
        pa.field("group", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ]
)


class DatasetError(RaysemiError):
    """A dataset that cannot be read or written; the message is one line for the user."""


def image_id(data: bytes) -> str:
    """Stable id of an encoded image: the sha256 of its bytes (so exact copies share an id)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root, e.g. "train/part-00000.parquet"
    rows: int
    labeled: int
    sha256: str


@dataclass
class SplitInfo:
    rows: int = 0
    labeled: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)  # class name -> count
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    quarantined: dict[str, int] = field(default_factory=dict)  # reason kind -> inputs (the rows: QUARANTINE)
    duplicates: int = 0  # exact copies (same sha256) dropped at ingest
    source: str = ""
    synthetic: bool = False
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def shard_uris(self, root: str, split: str) -> list[str]:
        if split not in self.splits:
            raise DatasetError(f"dataset {root} has no split {split!r} (it has: {', '.join(self.splits)})")
        return [join(root, s.path) for s in self.splits[split].shards]

    def shard_hashes(self, split: str) -> list[str]:
        """The sha256 of each shard file of ``split``, in the order of ``shard_uris``."""
        return [s.sha256 for s in self.splits[split].shards] if split in self.splits else []

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format_version") not in READABLE_VERSIONS:
            raise DatasetError(f"manifest format {raw.get('format_version')!r} is not one of {READABLE_VERSIONS}")
        if "quarantine" in raw:  # format 1 listed every quarantined input in the manifest
            raw["quarantined"] = reason_counts(q["reason"] for q in raw.pop("quarantine"))
        splits = {
            name: SplitInfo(
                rows=s["rows"],
                labeled=s["labeled"],
                label_counts=dict(s.get("label_counts", {})),
                shards=[ShardInfo(**sh) for sh in s["shards"]],
            )
            for name, s in raw["splits"].items()
        }
        raw["splits"] = splits
        return cls(**raw)


def reason_kind(reason: str) -> str:
    """A quarantine reason without its particulars: "over pixel limit (9000 x 9000)" -> "over pixel limit"."""
    return reason.split(" (")[0]


def reason_counts(reasons) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in reasons:
        counts[reason_kind(r)] = counts.get(reason_kind(r), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def read_quarantine(root: str) -> pa.Table:
    """Every input of the dataset at ``root`` that was not stored, with its reason (empty when none was)."""
    fs, path = filesystem(root)
    qpath = f"{path.rstrip('/')}/{QUARANTINE}"
    try:
        with fs.open(qpath, "rb") as fh:
            return pq.read_table(fh)
    except FileNotFoundError:
        manifest = read_manifest(root)
        if manifest.quarantined_total:
            raise DatasetError(f"{root}/{QUARANTINE} is missing ({manifest.quarantined_total} inputs were quarantined)") \
                from None
        return QUARANTINE_SCHEMA.empty_table()


def dataset_exists(root: str) -> bool:
    fs, path = filesystem(root)
    return fs.exists(f"{path.rstrip('/')}/{MANIFEST}")


def read_manifest(root: str) -> Manifest:
    """The manifest of the dataset at ``root``; a clear error when there is none."""
    fs, path = filesystem(root)
    mpath = f"{path.rstrip('/')}/{MANIFEST}"
    with storage_errors(f"cannot read {root}", DatasetError):  # the first access: S3 refusing, no credentials
        try:
            with fs.open(mpath, "rb") as fh:
                text = fh.read().decode()
        except FileNotFoundError:
            raise DatasetError(f"no {MANIFEST} at {root}: not a raysemi dataset (or an unfinished ingest)") from None
        except PermissionError as err:
            raise DatasetError(f"cannot read {root}: access denied ({err})") from None
    try:
        return Manifest.from_json(text)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{root}/{MANIFEST} is malformed: {err}") from None


def write_manifest(root: str, manifest: Manifest) -> None:
    write_bytes_atomic(join(root, MANIFEST), manifest.to_json().encode())


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Small row groups keep the loader's memory bounded when it streams a shard.
    pq.write_table(table, buf, row_group_size=512, compression="zstd")
    return buf.getvalue()


def write_shard(root: str, relpath: str, table: pa.Table, class_count: int | None = None) -> ShardInfo:
    """Write one shard atomically and describe it for the manifest. Columns beyond ``SCHEMA`` (DICOM tags a
    user chose to keep) follow the contract's five."""
    base = table.select(SCHEMA.names)
    base = base.cast(SCHEMA) if base.schema != SCHEMA else base
    for name in (n for n in table.column_names if n not in SCHEMA.names):
        base = base.append_column(table.schema.field(name), table.column(name))
    table = base
    data = table_bytes(table)
    write_bytes_atomic(join(root, relpath), data)
    labeled = table.num_rows - table.column("label").null_count
    return ShardInfo(path=relpath, rows=table.num_rows, labeled=labeled, sha256=hashlib.sha256(data).hexdigest())


def read_shard(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The shard at ``uri`` (only ``columns`` when given: on S3 then only their byte ranges are fetched)."""
    fs, path = filesystem(uri)
    try:
        small = columns is not None and "image" not in columns
        with (open_exact(uri) if small else fs.open(path, "rb")) as fh:
            return pq.read_table(fh, columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise DatasetError(f"shard {uri} is missing") from None


def read_split(root: str, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    manifest = read_manifest(root)
    tables = [read_shard(u, columns) for u in manifest.shard_uris(root, split)]
    if not tables:
        return SCHEMA.empty_table().select(list(columns) if columns else SCHEMA.names)
    return pa.concat_tables(tables)


def remove_dataset(root: str) -> None:
    """Delete what raysemi wrote of a dataset (``outputs.DATASET``: the manifest, the shard files; anything
    else in the folder stays): the manifest first, so a half-deleted folder never looks complete."""
    from raysemi.core.outputs import DATASET, clear

    fs, path = filesystem(root)
    mpath = f"{path.rstrip('/')}/{MANIFEST}"
    if fs.exists(mpath):
        fs.rm(mpath)
    clear(root, DATASET)


MAX_TASKS = 256  # tasks per map over a dataset's shards: bounds the per-task summaries the caller holds

# Runs ``fn(*args)`` for each tuple of a list and returns the results in order: ``local_map`` in this
# process, or ``ray_tasks.task_mapper`` on the cluster. The per-row work of a map is what ``fn`` does.
Mapper = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def local_map(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
    return [fn(*a) for a in args]


def shard_groups(items: Sequence[Any], rows: Sequence[int] | None = None, max_tasks: int = MAX_TASKS) -> list[list[Any]]:
    """Contiguous groups of shards, one per task: a shard each, or about equal rows when there are more
    than ``max_tasks`` shards (a map then costs at most ``max_tasks`` tasks and summaries)."""
    if len(items) <= max_tasks:
        return [[u] for u in items]
    rows = list(rows) if rows is not None else [1] * len(items)
    total, groups, acc = sum(rows), [[]], 0
    for item, n in zip(items, rows):
        if groups[-1] and acc >= total * len(groups) / max_tasks:
            groups.append([])
        groups[-1].append(item)
        acc += n
    return groups


def assign_shards(shards: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Round-robin shards over global ranks: rank r gets shards r, r+W, r+2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within a world of size {world_size}")
    if len(shards) < world_size:
        raise DatasetError(f"{len(shards)} shards cannot feed {world_size} workers: re-ingest with more shards")
    return list(shards[rank::world_size])


def steps_per_epoch(shard_rows: Sequence[int], world_size: int, batch_per_rank: int) -> int:
    """Equal step count for every rank (the smallest rank's full batches), or DDP hangs at epoch end."""
    per_rank = [sum(shard_rows[r::world_size]) for r in range(world_size)]
    steps = min(per_rank) // batch_per_rank
    if steps < 1:
        raise DatasetError(
            f"a batch of {batch_per_rank} per worker is larger than the smallest worker's {min(per_rank)} rows"
        )
    return steps


def split_batch(global_batch: int, world_size: int) -> int:
    """Per-rank batch of a global batch (rounded down: the global batch is at most what was asked)."""
    if global_batch < world_size:
        raise ValueError(f"batch size {global_batch} is smaller than the {world_size} workers")
    return global_batch // world_size
