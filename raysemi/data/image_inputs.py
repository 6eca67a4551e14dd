"""What ``raysemi predict`` classifies: SOURCE listed, nothing read yet.

* **an image folder** (local) or **an object-store prefix** (``s3://bucket/prefix``): every file below it
  whose extension is an image format's (``IMAGE_EXTENSIONS``; hidden files and folders skipped), in sorted
  order; the path shown is relative to SOURCE. Other files are counted as ignored. One image file works too.
* **a CSV of paths** (local or ``s3://``): a header naming a ``path`` column (other columns ignored);
  relative paths are relative to the CSV's folder; the path shown is the CSV's own.
* **an ingested dataset** (a folder or prefix holding ``manifest.json``): its shards, of one split or of
  ``all``; the path shown is the rows' ``source``.

A listing's ``fingerprint`` names what was listed, so that a resumed run can tell that SOURCE changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from raysemi import io as rio
from raysemi.data.shards import MANIFEST, SPLITS, dataset_exists, read_manifest
from raysemi.data.sources import list_files
from raysemi.errors import RaysemiError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".webp",
     ".pgm", ".ppm", ".pnm", ".pbm"}
)
KINDS = ("folder", "prefix", "csv", "dataset")


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
    images: list[ImageRef] = field(default_factory=list)  # folder / prefix / csv
    shards: list[tuple[str, str, str]] = field(default_factory=list)  # dataset: (split, uri, sha256), in order
    ignored: int = 0  # files below a folder / prefix that are not images by their extension

    def fingerprint(self) -> str:
        """sha256 of the kind and of every path listed (dataset: every shard and its sha256)."""
        h = hashlib.sha256(self.kind.encode())
        for ref in self.images:
            h.update(b"\0" + ref.path.encode())
        for split, uri, sha in self.shards:
            h.update(b"\0" + f"{split}:{uri}:{sha}".encode())
        return h.hexdigest()


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _absolute(source: str) -> str:
    return source if rio.is_remote(source) else str(Path(source).expanduser().resolve())


def list_source(source: str, split: str = "all") -> Listing:
    """List SOURCE (see the module docstring); ``InputError`` when it is missing, empty or malformed."""
    src = _absolute(str(source))
    try:
        if dataset_exists(src):
            return _list_dataset(src, split)
        if split != "all":
            raise InputError(f"--split applies to an ingested dataset; {source} has no {MANIFEST}")
        fs, path = rio.filesystem(src)
        if not fs.exists(path):
            raise InputError(f"source {source} does not exist")
        if fs.isdir(path):
            listing = _list_folder(src) if not rio.is_remote(src) else _list_prefix(src)
        elif path.lower().endswith(".csv"):
            listing = _list_csv(src)
        elif is_image_name(path):
            listing = Listing("folder", src, [ImageRef(path.rsplit("/", 1)[-1], src)])
        else:
            raise InputError(f"source {source} is neither an image folder, a prefix, a .csv nor a dataset")
    except PermissionError as err:
        raise InputError(f"cannot read source {source}: access denied ({err})") from None
    except (OSError, ValueError) as err:
        if isinstance(err, RaysemiError):
            raise
        raise InputError(f"cannot read source {source}: {type(err).__name__}: {err}") from None
    if not listing.images:
        extra = f" ({listing.ignored} other files ignored)" if listing.ignored else ""
        raise InputError(f"no image files in {source}{extra}")
    return listing


def _list_folder(src: str) -> Listing:
    root = Path(src)
    files = list_files(root)
    images = [ImageRef(f.relative_to(root).as_posix(), str(f)) for f in files if is_image_name(f.name)]
    return Listing("folder", src, images, ignored=len(files) - len(images))


def _list_prefix(src: str) -> Listing:
    fs, path = rio.filesystem(src)
    base = path.rstrip("/") + "/"
    keys = sorted(k for k in fs.find(base) if k.startswith(base))
    rel = [k[len(base):] for k in keys]
    rel = [r for r in rel if r and not any(p.startswith(".") for p in r.split("/"))]
    images = [ImageRef(r, rio.join(src, r)) for r in rel if is_image_name(r)]
    return Listing("prefix", src, images, ignored=len(rel) - len(images))


def _list_csv(src: str) -> Listing:
    try:
        text = rio.read_bytes(src).decode("utf-8-sig")
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read CSV {src}: {err}") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "path" not in header:
        raise InputError(f"CSV {src} needs a header with a 'path' column (it has: {', '.join(header) or 'none'})")
    col = header.index("path")
    base = src.rsplit("/", 1)[0]
    images, seen = [], set()
    for n, row in enumerate(rows[1:], start=2):
        p = row[col].strip() if col < len(row) else ""
        if not p:
            raise InputError(f"CSV {src} line {n} has no path")
        if p in seen:
            continue  # one prediction per image named
        seen.add(p)
        absolute = rio.is_remote(p) or Path(p).is_absolute()
        images.append(ImageRef(p, p if absolute else rio.join(base, p)))
    return Listing("csv", src, images)


def _list_dataset(src: str, split: str) -> Listing:
    manifest = read_manifest(src)
    if split == "all":
        splits = [s for s in SPLITS if s in manifest.splits] + [s for s in manifest.splits if s not in SPLITS]
    elif split in manifest.splits:
        splits = [split]
    else:
        raise InputError(f"dataset {src} has no split {split!r} (it has: {', '.join(manifest.splits)}, or all)")
    # with each shard's sha256, so that the fingerprint changes when the dataset is re-ingested
    shards = [(s, rio.join(src, sh.path), sh.sha256) for s in splits for sh in manifest.splits[s].shards]
    if not shards:
        raise InputError(f"dataset {src} has no rows in {'any split' if split == 'all' else f'split {split}'}")
    return Listing("dataset", src, shards=shards)
