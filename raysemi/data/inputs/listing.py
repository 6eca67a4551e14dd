"""What ``raysemi predict`` classifies: SOURCE listed, streamed into Parquet listing parts, nothing read yet.

* **an image folder** (local) or **an object-store prefix** (``s3://bucket/prefix``): every file below it
  whose extension is an image format's (``IMAGE_EXTENSIONS``; hidden files and folders skipped), in sorted
  order; the path shown is relative to SOURCE. Other files are counted as ignored. One image file works too.
* **a CSV of paths** (local or ``s3://``): a header naming a ``path`` column (other columns ignored);
  relative paths are relative to the CSV's folder; the path shown is the CSV's own; a path named twice once.
* **an ingested dataset** (a folder or prefix holding ``manifest.json``): its shards, of one split or of
  ``all``; the path shown is the rows' ``source``.

``list_source`` checks SOURCE and finds its first image (so an empty source is refused before anything is
written); ``stream_listing`` then walks it once, in bounded memory, into ``<dest>/list-NNNNN.parquet`` parts
of ``LIST_ROWS`` paths (``path``, ``uri``) and ``<dest>/listing.json`` last, computing the fingerprint on the
way. The folder and prefix walk (``data/sources.walk_files``, ingest's too: one folder level listed at a time, the same rules
and order locally and on S3) and the CSV reader (pyarrow's streaming reader) are generators: what they hold is
one folder's names (the sort needs them) or one CSV block. A CSV's repeated paths are found in a temporary on-disk
SQLite index beside the driver, not a Python set. A listing's ``fingerprint`` names what was listed, so that a
resumed run can tell that SOURCE changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from raysemi.core import io as rio
from raysemi.core.errors import RaysemiError
from raysemi.data.shards import MANIFEST, SPLITS, dataset_exists, read_manifest
from raysemi.data.sources import relative_path, walk_files

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".webp",
     ".pgm", ".ppm", ".pnm", ".pbm"}
)
KINDS = ("folder", "prefix", "csv", "dataset")
LIST_ROWS = 65_536  # paths per listing part: part p holds listing rows [p * LIST_ROWS, (p + 1) * LIST_ROWS)
LIST_GROUP = 1_024  # rows per row group of a part, so that a task reads only the range it stages
CSV_BLOCK = 1 << 20  # bytes of CSV parsed at a time
RECORD = "listing.json"
LISTING_SCHEMA = pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False)])


class InputError(RaysemiError):
    """SOURCE cannot be listed; one line for the user."""


@dataclass(frozen=True)
class ImageRef:
    path: str  # as shown in the output
    uri: str  # where to read it (local path or URI)


@dataclass
class Listing:
    kind: str  # one of KINDS
    source: str  # SOURCE, made absolute when local
    shards: list[tuple[str, str, str]] = field(default_factory=list)  # dataset: (split, uri, sha256), in order
    shard_rows: list[int] = field(default_factory=list)  # dataset: rows of each shard (the manifest's)
    ignored: int = 0  # files below a folder / prefix that are not images by their extension
    rows: int = 0  # images listed (streamed kinds: once streamed)
    dest: str | None = None  # where the listing parts are (streamed kinds: once streamed)
    digest: str | None = None

    @property
    def streamed(self) -> bool:
        return self.kind != "dataset"

    def fingerprint(self) -> str:
        """sha256 of the kind and of every path listed (dataset: every shard and its sha256)."""
        if self.streamed:
            if self.digest is None:
                raise RaysemiError(f"the listing of {self.source} has not been streamed yet")
            return self.digest
        h = hashlib.sha256(self.kind.encode())
        for split, uri, sha in self.shards:
            h.update(b"\0" + f"{split}:{uri}:{sha}".encode())
        return h.hexdigest()


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def _errors(source: str) -> Iterator[None]:
    """Storage and parse errors while listing, as one line."""
    try:
        yield
    except PermissionError as err:
        raise InputError(f"cannot read source {source}: access denied ({err})") from None
    except (OSError, ValueError, pa.ArrowException) as err:
        if isinstance(err, RaysemiError):
            raise
        raise InputError(f"cannot read source {source}: {type(err).__name__}: {err}") from None


def list_source(source: str, split: str = "all") -> Listing:
    """Check SOURCE (see the module docstring) and find its first image; ``InputError`` when it is missing,
    empty or malformed. A dataset is listed whole (its shards); the other kinds are streamed later."""
    src = rio.absolute(str(source))
    with _errors(source):
        if dataset_exists(src):
            return _list_dataset(src, split)
        if split != "all":
            raise InputError(f"--split applies to an ingested dataset; {source} has no {MANIFEST}")
        fs, path = rio.filesystem(src)
        if not fs.exists(path):
            raise InputError(f"source {source} does not exist")
        if fs.isdir(path):
            listing = Listing("folder" if not rio.is_remote(src) else "prefix", src)
        elif path.lower().endswith(".csv"):
            listing = Listing("csv", src)
        elif is_image_name(path):
            listing = Listing("folder", src)
        else:
            raise InputError(f"source {source} is neither an image folder, a prefix, a .csv nor a dataset")
        walk = _Walk(listing)
        if next(iter(walk), None) is None:  # the whole walk when there is no image: nothing kept
            extra = f" ({walk.ignored} other files ignored)" if walk.ignored else ""
            raise InputError(f"no image files in {source}{extra}")
    return listing


def stream_listing(listing: Listing, dest: str | None) -> Listing:
    """Walk the source of ``listing`` once: its row count, ignored count and fingerprint, and with ``dest`` its
    listing parts and ``listing.json`` (written last) there. Returns the completed listing."""
    walk, h = _Walk(listing), hashlib.sha256(listing.kind.encode())
    rows, part, batch = 0, 0, {"path": [], "uri": []}

    def flush() -> None:
        nonlocal part
        if dest is not None and batch["path"]:
            t = pa.table(batch, schema=LISTING_SCHEMA)
            buf = io.BytesIO()
            pq.write_table(t, buf, row_group_size=LIST_GROUP, compression="zstd")
            rio.write_bytes_atomic(part_uri(dest, part), buf.getvalue())
        part += 1
        batch["path"], batch["uri"] = [], []

    with _errors(listing.source):
        for ref in walk:
            h.update(b"\0" + ref.path.encode())
            batch["path"].append(ref.path)
            batch["uri"].append(ref.uri)
            rows += 1
            if len(batch["path"]) == LIST_ROWS:
                flush()
        flush()
    done = Listing(listing.kind, listing.source, ignored=walk.ignored, rows=rows, dest=dest, digest=h.hexdigest())
    if dest is not None:
        rio.write_json(rio.join(dest, RECORD), {"kind": done.kind, "source": done.source, "rows": rows,
                                               "ignored": done.ignored, "fingerprint": done.digest})
    return done


def committed_listing(listing: Listing, dest: str) -> Listing | None:
    """The listing streamed into ``dest`` earlier, when its record is there and names the same source."""
    try:
        rec = rio.read_json(rio.join(dest, RECORD))
    except (FileNotFoundError, ValueError):
        return None
    if (rec.get("kind"), rec.get("source")) != (listing.kind, listing.source):
        return None
    return Listing(listing.kind, listing.source, ignored=rec["ignored"], rows=rec["rows"], dest=dest,
                   digest=rec["fingerprint"])


def part_uri(dest: str, p: int) -> str:
    return rio.join(dest, f"list-{p:05d}.parquet")


def listing_rows(dest: str, lo: int, hi: int) -> pa.Table:
    """Listing rows ``[lo, hi)`` (``path``, ``uri``), reading only the row groups that hold them."""
    parts = []
    for p in range(lo // LIST_ROWS, (hi - 1) // LIST_ROWS + 1 if hi > lo else lo // LIST_ROWS):
        a, b = max(lo - p * LIST_ROWS, 0), min(hi - p * LIST_ROWS, LIST_ROWS)
        with rio.open_exact(part_uri(dest, p)) as fh:
            t = pq.ParquetFile(fh).read_row_groups(list(range(a // LIST_GROUP, (b - 1) // LIST_GROUP + 1)))
        parts.append(t.slice(a - (a // LIST_GROUP) * LIST_GROUP, b - a))
    return pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()


def read_listing(listing: Listing) -> list[ImageRef]:
    """Every image of a streamed listing, as a list: for tests and small listings only."""
    t = listing_rows(listing.dest, 0, listing.rows) if listing.rows else LISTING_SCHEMA.empty_table()
    return [ImageRef(p, u) for p, u in zip(t.column("path").to_pylist(), t.column("uri").to_pylist())]


# ---------------------------------------------------------------- the walks (generators)


class _Walk:
    """The images of a folder / prefix / CSV source as ``ImageRef``, in order; ``ignored`` counts the rest."""

    def __init__(self, listing: Listing) -> None:
        self.listing, self.ignored = listing, 0

    def __iter__(self) -> Iterator[ImageRef]:
        src = self.listing.source
        if self.listing.kind == "csv":
            yield from _csv_paths(src)
            return
        files: Iterator[tuple[str, str]]
        if self.listing.kind == "folder" and (rio.is_remote(src) or not Path(src).is_dir()):  # one image file
            files = iter([(src.rstrip("/").rsplit("/", 1)[-1], src)])
        else:  # ingest's walk: the same rules and order for a folder and a prefix
            root = src if rio.is_remote(src) else Path(src)
            files = ((relative_path(f, root), str(f)) for f in walk_files(root))
        for rel, uri in files:
            if is_image_name(rel):
                yield ImageRef(rel, uri)
            else:
                self.ignored += 1


def _csv_header(src: str) -> tuple[list[str], int]:
    fs, path = rio.filesystem(src)
    with fs.open(path, "rb") as fh:
        first = fh.readline().decode("utf-8-sig")
    header = next(csv.reader([first]), []) if first.strip() else []
    names = [c.strip().lower() for c in header]
    if "path" not in names:
        raise InputError(f"CSV {src} needs a header with a 'path' column (it has: {', '.join(names) or 'none'})")
    return header, names.index("path")


def _csv_paths(src: str) -> Iterator[ImageRef]:
    """The CSV's paths, block by block (pyarrow's streaming reader), each path once (the first time)."""
    header, col = _csv_header(src)
    base = src.rsplit("/", 1)[0]
    names = [f"c{i}" for i in range(len(header))]  # the header's own names may repeat or be blank
    read = pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=CSV_BLOCK)
    convert = pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False,
                                  quoted_strings_can_be_null=False)
    fs, path = rio.filesystem(src)
    line = 1
    with tempfile.TemporaryDirectory(prefix="raysemi-csv-") as tmp, fs.open(path, "rb") as fh:
        db = sqlite3.connect(os.path.join(tmp, "seen.db"))
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE seen (path TEXT PRIMARY KEY) WITHOUT ROWID")
            for batch in pcsv.open_csv(fh, read_options=read, convert_options=convert):
                cells = [pc.utf8_trim_whitespace(c) for c in batch.columns]
                blank = pc.equal(cells[0], "")
                for c in cells[1:]:
                    blank = pc.and_(blank, pc.equal(c, ""))
                for p, empty in zip(cells[col].to_pylist(), blank.to_pylist()):
                    line += 1
                    if empty:
                        continue
                    if not p:
                        raise InputError(f"CSV {src} line {line} has no path")
                    if db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (p,)).rowcount != 1:
                        continue  # one prediction per image named
                    absolute = rio.is_remote(p) or Path(p).is_absolute()
                    yield ImageRef(p, p if absolute else rio.join(base, p))
        finally:
            db.close()


def _list_dataset(src: str, split: str) -> Listing:
    manifest = read_manifest(src)
    if split == "all":
        splits = [s for s in SPLITS if s in manifest.splits] + [s for s in manifest.splits if s not in SPLITS]
    elif split in manifest.splits:
        splits = [split]
    else:
        raise InputError(f"dataset {src} has no split {split!r} (it has: {', '.join(manifest.splits)}, or all)")
    # with each shard's sha256, so that the fingerprint changes when the dataset is re-ingested
    infos = [(s, sh) for s in splits for sh in manifest.splits[s].shards]
    if not infos:
        raise InputError(f"dataset {src} has no rows in {'any split' if split == 'all' else f'split {split}'}")
    return Listing("dataset", src, shards=[(s, rio.join(src, sh.path), sh.sha256) for s, sh in infos],
                   shard_rows=[sh.rows for _, sh in infos], rows=sum(sh.rows for _, sh in infos))
