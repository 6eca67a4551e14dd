"""Source scanners: an image folder, a MedMNIST-style ``.npz``, a CSV or an ``--unlabeled`` folder -> a list
of ``Item`` (one per input, nothing decoded yet) with the class names and the splits the source names;
plus format detection. Validation, dedup, splitting and writing are ``ingest.py``'s.

* **folder**: one subfolder per class (``ROOT/<class>/**``), optionally under split folders
  (``ROOT/{train,val,test}/<class>/**``); a top-level ``ROOT/unlabeled/**`` holds unlabeled images.
* **npz**: ``train_images`` + ``train_labels`` (and ``val_*``, ``test_*``, ``unlabeled_images``), uint8
  ``NxHxW`` or ``NxHxWxC``; class names from a ``label_names`` or ``classes`` key, else ``"0".."C-1"``.
* **csv**: rows ``path,label[,group]`` (a header naming ``path,label,group[,split]`` is optional); paths
  are relative to the CSV's folder; an empty label makes the row unlabeled.
* **dicom**: a folder tree of DICOM files (any name; found by ``DICM`` at byte 128; other files, DICOMDIR
  included, are skipped and counted), labelled by class folders laid out as for **folder**, or by a
  ``--labels`` CSV (``label`` plus one key column: ``path`` (relative to the tree), ``SOPInstanceUID`` or
  ``StudyInstanceUID``; optional ``split``), in which case files the CSV does not name are unlabeled. The
  group is the salted hash of PatientID (or StudyInstanceUID); the headers are read here, the pixels in
  ``ingest.py`` through ``dicom.render``.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysemi.core import io as rio
from raysemi.data.ingest.dicom import read as dicom
from raysemi.data.ingest.dicom import render as dicom_render
from raysemi.data.ingest.validate import Checked
from raysemi.data.shards import SPLITS, DatasetError
from raysemi.data.sources import (
    OUTSIDE_LINK,
    Root,
    child,
    escapes,
    is_dir,
    is_remote_root,
    name_of,
    relative_path,
    subdirs,
    walk_files,
)

FORMATS = ("auto", "folder", "npz", "csv", "dicom")
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Item:
    source: str  # path relative to the source, "npz:train:12", or "unlabeled:<path in --unlabeled DIR>"
    label: str | None
    group: str | None
    split: str | None  # split named by the source, or None (carved by fraction)
    path: Path | None = None
    array: np.ndarray | None = None
    sha: str = ""
    check: Checked | None = None
    keep: bytes | None = None  # stored bytes held in memory (converted or generated); else re-read
    nbytes: int = 0
    dicom: dicom_render.DicomRef | None = None  # a DICOM frame to render (``path`` then points at the rendering)
    sort_key: str = ""  # row order when ``source`` is a salted hash (so order does not depend on the salt)
    group_sort: str | None = None  # the same for the group
    uri: str | None = None  # where to read it when it is on an object store (then ``path`` is None)
    named: bool = False  # named by a CSV: a missing file stops the ingest (a listed one is just quarantined)


def quarantine_escaping(items: list[Item], trees: tuple[Path, ...] | None = None) -> list[Item]:
    """``items``, those whose file escapes the source trees quarantined (``OUTSIDE_LINK``) before any read."""
    for it in items:
        if it.path is not None and it.check is None and it.dicom is None and escapes(it.path, trees):
            it.check = Checked(reason=OUTSIDE_LINK)
    return items


def _item(f: Root, source: str, label: str | None, group: str | None, split: str | None) -> Item:
    if isinstance(f, Path):
        return Item(source, label, group, split, path=f)
    return Item(source, label, group, split, uri=f)


def _group_of(name: str, regex: re.Pattern | None) -> str | None:
    if regex is None:
        return None
    m = regex.search(name)
    return None if m is None else (m.group(1) if regex.groups else m.group(0))


@dataclass
class Scan:
    """A source being scanned: ``items`` is streamed (an iterator, one folder or CSV row at a time).
    ``classes`` and ``provided`` (the splits the source names) are final once ``items`` is exhausted."""

    items: Iterator[Item]
    classes: list[str]
    provided: set[str]


def scan_folder(root: Root, regex, say_names: bool = True) -> Scan:
    folders = subdirs(root)
    split_dirs = [p for p in folders if name_of(p).lower() in _SPLIT_DIRS]
    if split_dirs:
        others = [name_of(p) for p in folders if p not in split_dirs and name_of(p) != "unlabeled"]
        if others:
            # A DICOM export's folders can be named after patients: count them, do not print them.
            what = ", ".join(others) if say_names else f"{len(others)} of them"
            raise DatasetError(f"{root} mixes split folders (train/val/test) with other folders: {what}")
        layout = [(_SPLIT_DIRS[name_of(p).lower()], p) for p in split_dirs]
    else:
        layout = [(None, root)]
    per_split = [(split, [c for c in subdirs(base) if not (split is None and name_of(c) == "unlabeled")])
                 for split, base in layout]
    classes = sorted({name_of(c) for _, cdirs in per_split for c in cdirs})
    if not classes:
        raise DatasetError(f"{root} has no class subfolders (expected {root}/<class>/<image files>)")
    unlabeled = child(root, "unlabeled")

    def items() -> Iterator[Item]:
        for split, cdirs in per_split:
            for cdir in cdirs:
                for f in walk_files(cdir):
                    yield _item(f, relative_path(f, root), name_of(cdir), _group_of(name_of(f), regex), split)
        if is_dir(unlabeled):
            yield from scan_unlabeled(unlabeled, regex, prefix="unlabeled/")

    return Scan(items(), classes, {s for s, _ in layout if s})


def scan_unlabeled(root: Root, regex, prefix: str) -> Iterator[Item]:
    for f in walk_files(root):
        yield _item(f, f"{prefix}{relative_path(f, root)}", None, _group_of(name_of(f), regex), "unlabeled")


def scan_npz(path: Root) -> Scan:
    fs, local = rio.filesystem(str(path))
    try:
        with fs.open(local, "rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            keys = set(npz.files)
            arrays = {k: npz[k] for k in keys}  # an .npz is read whole (MedMNIST-sized sources)
    except Exception as err:
        raise DatasetError(f"{path} is not a readable .npz file ({err})") from None
    if "train_images" not in keys:
        raise DatasetError(f"{path} has no 'train_images' key (it has: {', '.join(sorted(keys)) or 'none'})")
    items: list[Item] = []
    max_label = -1
    provided = set()
    for split in SPLITS:
        if f"{split}_images" not in keys:
            continue
        images = arrays[f"{split}_images"]
        if (
            images.dtype != np.uint8
            or images.ndim not in (3, 4)
            or (images.ndim == 4 and images.shape[3] not in (1, 3, 4))
        ):
            raise DatasetError(
                f"{path}: '{split}_images' is {images.dtype} {images.shape}, expected uint8 NxHxW[xC]"
            )
        labels = None
        if split != "unlabeled":
            if f"{split}_labels" not in keys:
                raise DatasetError(f"{path} has '{split}_images' but no '{split}_labels' key")
            labels = np.asarray(arrays[f"{split}_labels"])
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
                raise DatasetError(
                    f"{path}: '{split}_labels' is {labels.dtype} {labels.shape}, expected {images.shape[0]} integer "
                    "labels (multi-label data is not supported)"
                )
            if labels.size and labels.min() < 0:
                raise DatasetError(f"{path}: '{split}_labels' has negative labels")
            max_label = max(max_label, int(labels.max()) if labels.size else -1)
            provided.add(split)
        for i in range(images.shape[0]):
            label = None if labels is None else int(labels[i])
            items.append(Item(f"npz:{split}:{i}", label, None, split, array=images[i]))
    names_key = next((k for k in ("label_names", "classes") if k in keys), None)
    if names_key:
        classes = [str(c) for c in np.asarray(arrays[names_key]).ravel()]
        if len(classes) <= max_label:
            raise DatasetError(
                f"{path}: '{names_key}' names {len(classes)} classes but a label is {max_label}"
            )
    else:
        classes = [str(c) for c in range(max_label + 1)]
    for it in items:
        if it.label is not None:
            it.label = classes[it.label]
    return Scan(iter(items), classes, provided)


def scan_csv(path: Root, regex) -> Scan:
    """Rows ``path,label[,group[,split]]`` streamed; a path is relative to the CSV's folder. A file the CSV
    names that does not exist is found when it is read (``Item.named``): ingest then stops with a count."""
    fs, local = rio.filesystem(str(path))
    try:
        fh = fs.open(local, "r", newline="", encoding="utf-8-sig")
        rows = (r for r in csv.reader(fh) if r and any(c.strip() for c in r) and not r[0].startswith("#"))
        first_row = next(rows, None)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read CSV {path}: {err}") from None
    cols = {"path": 0, "label": 1, "group": 2, "split": None}
    first = [c.strip().lower() for c in first_row] if first_row else []
    if "path" in first:
        cols = {k: (first.index(k) if k in first else None) for k in cols}
        if cols["label"] is None:
            raise DatasetError(f"CSV {path} has a header without a 'label' column")
        first_row = next(rows, None)
    if first_row is None:
        raise DatasetError(f"CSV {path} has no rows")
    base = path.parent if isinstance(path, Path) else path.rstrip("/").rsplit("/", 1)[0]
    scan = Scan(iter(()), [], set())
    labels: set[str] = set()

    def items() -> Iterator[Item]:
        try:
            for n, row in enumerate(itertools.chain([first_row], rows), start=1):
                def cell(key, row=row):
                    i = cols[key]
                    return row[i].strip() if i is not None and i < len(row) else ""

                rel = cell("path")
                if len(row) < 2 or not rel:
                    raise DatasetError(f"CSV {path} row {n} is not 'path,label[,group]': {','.join(row)}")
                label = cell("label") or None
                split = cell("split").lower() or None
                if split is not None and split not in SPLITS:
                    raise DatasetError(f"CSV {path} row {n}: unknown split {split!r}")
                if label is None or split == "unlabeled":
                    label, split = None, "unlabeled"
                f = _resolve(base, rel)
                group = cell("group") or _group_of(name_of(f), regex)
                if label is not None:
                    labels.add(label)
                if split in ("train", "val", "test"):
                    scan.provided.add(split)
                it = _item(f, rel, label, group, split)
                it.named = True
                yield it
        except (UnicodeDecodeError, csv.Error) as err:
            raise DatasetError(f"cannot read CSV {path}: {err}") from None
        finally:
            fh.close()
        numeric = all(re.fullmatch(r"-?\d+", x) for x in labels)
        scan.classes[:] = sorted(labels, key=(lambda x: int(x)) if numeric else None)

    scan.items = items()
    return scan


def _resolve(base: Root, rel: str) -> Root:
    if rio.is_remote(rel):
        return rel
    if isinstance(base, Path):
        return Path(rel) if Path(rel).is_absolute() else base / rel
    return rio.join(base, rel)


def detect_format(source: Root, fmt: str) -> str:
    """The source's format: ``fmt``, or (``auto``) told from what ``source`` is (a local path or a URI)."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    if is_remote_root(source):
        fs, path = rio.filesystem(source)
        is_dir, exists = fs.isdir(path), fs.exists(path)
        if fmt == "dicom":
            raise DatasetError(f"a DICOM source must be a local folder: {source} (copy it down first)")
    else:
        is_dir, exists = source.is_dir(), source.exists()
    if not exists:
        raise DatasetError(f"source {source} does not exist")
    if fmt == "dicom" and not is_dir:
        raise DatasetError(f"a DICOM source must be a folder: {source}")
    if fmt != "auto":
        return fmt
    if is_dir:
        return "dicom" if not is_remote_root(source) and dicom.looks_like_dicom(source) else "folder"
    suffix = name_of(source).rsplit(".", 1)[-1].lower() if "." in name_of(source) else ""
    if suffix in ("npz", "csv"):
        return suffix
    raise DatasetError(f"unknown source format: {source} (expected an image folder, a .npz or a .csv file)")
