"""Scanning a DICOM tree (and an ``--unlabeled`` DICOM folder) into ``sources.Item``: headers read, one item
per frame, labels from class folders or a ``--labels`` CSV (see ``sources.py``'s docstring for the layouts).
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from raysemi.data.ingest.dicom import header as dicom_header
from raysemi.data.ingest.dicom import read as dicom
from raysemi.data.ingest.dicom import render as dicom_render
from raysemi.data.ingest.sources import Item, scan_folder, scan_unlabeled
from raysemi.data.ingest.validate import Checked
from raysemi.data.shards import DatasetError
from raysemi.data.sources import OUTSIDE_LINK, escapes, list_files

_KEY_COLUMNS = {
    "path": "path",
    "sopinstanceuid": "SOPInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "studyinstanceuid": "StudyInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
}


def _norm_path(text: str) -> str:
    return text.strip().replace("\\", "/").removeprefix("./")


def _read_dicom_labels(path: Path) -> tuple[str, dict[str, tuple[str | None, str | None]]]:
    """A ``--labels`` CSV -> (key kind, {key: (label, split)}). Errors name rows, never values (a path or
    UID in it may identify a patient)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r) and not r[0].startswith("#")]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read labels CSV {path}: {type(err).__name__}") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    keys = [c for c in header if c in _KEY_COLUMNS]
    if len(keys) != 1 or "label" not in header:
        raise DatasetError(
            f"labels CSV {path} needs a header with 'label' and one key column: path, SOPInstanceUID or "
            "StudyInstanceUID (optional: split)"
        )
    kind = _KEY_COLUMNS[keys[0]]
    ki, li = header.index(keys[0]), header.index("label")
    si = header.index("split") if "split" in header else None
    out: dict[str, tuple[str | None, str | None]] = {}
    for n, row in enumerate(rows[1:], start=2):
        cell = [c.strip() for c in row] + [""] * len(header)
        key = _norm_path(cell[ki]) if kind == "path" else cell[ki]
        if not key:
            raise DatasetError(f"labels CSV {path} row {n} has an empty {keys[0]}")
        label = cell[li] or None
        split = (cell[si].lower() or None) if si is not None else None
        if split not in (None, "train", "val", "test"):
            raise DatasetError(f"labels CSV {path} row {n}: split must be train, val or test")
        if key in out and out[key] != (label, split):
            raise DatasetError(f"labels CSV {path} row {n} repeats the key of an earlier row with another label")
        out[key] = (label, split)
    if not out:
        raise DatasetError(f"labels CSV {path} has no rows")
    return kind, out


def _dicom_headers(items: list[Item], opts: dicom.DicomOptions, max_pixels: int, workers: int | None):
    # Threads: most of a header read is file I/O; the parse is short.
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda it: dicom_header.read_header(it.path, opts, max_pixels), items))


def _expand_dicom(
    base: list[Item],
    opts: dicom.DicomOptions,
    hasher: dicom.Hasher,
    stats: dict,
    *,
    max_pixels: int,
    workers: int | None,
    lookup: tuple[str, dict, Counter] | None = None,
    class_folders: bool = False,
) -> list[Item]:
    """Files -> DICOM items: one per frame taken, or one quarantined item per bad file; skipped files
    (not DICOM, DICOMDIR) are only counted."""
    key_name = dicom.GROUP_BY[opts.group_by]
    out: list[Item] = []
    for it in (it for it in base if it.path is not None and escapes(it.path)):  # never read
        pool = "unlabeled:" if it.source.startswith("unlabeled:") else ""
        src = it.source if opts.keep_paths else pool + hasher.source(it.source)
        out.append(Item(src, it.label, None, it.split, check=Checked(reason=OUTSIDE_LINK),
                        sort_key=dicom.Hasher.order(it.source)))
    base = [it for it in base if it.path is None or not escapes(it.path)]
    for it, h in zip(base, _dicom_headers(base, opts, max_pixels, workers)):
        if h.skip:
            stats["skipped"][h.skip] = stats["skipped"].get(h.skip, 0) + 1
            continue
        stats["files"] += 1
        rel = it.source
        pool = "unlabeled:" if rel.startswith("unlabeled:") else ""  # which folder: says nothing of a patient
        src = rel if opts.keep_paths else pool + hasher.source(rel)
        label, split = it.label, it.split
        if lookup is not None:
            kind, table, hits = lookup
            key = rel if kind == "path" else h.keys.get(kind)
            if key is not None and key in table:
                label, split = table[key]
                hits[key] += 1
            else:
                label, split = None, None
            if label is None:
                split = "unlabeled"
        if h.reason:
            out.append(Item(src, label, None, split, check=Checked(reason=h.reason), sort_key=dicom.Hasher.order(rel)))
            continue
        if class_folders and label is not None and dicom.names_patient(label, h.names):
            raise DatasetError(
                "a class folder is named after the patient of the DICOM files in it (their PatientID or "
                "PatientName): class names are stored in the manifest; label with --labels CSV instead"
            )
        raw = h.keys.get(key_name)
        if raw is None and split != "unlabeled":
            stats["missing_group_key"]["quarantined"] += 1
            reason = f"no {key_name} (the group key that keeps a patient on one side of the splits)"
            out.append(Item(src, label, None, split, check=Checked(reason=reason), sort_key=dicom.Hasher.order(rel)))
            continue
        if raw is None:
            stats["missing_group_key"]["unlabeled_kept"] += 1
        group = None if raw is None else hasher.group(opts.group_by, raw)
        for index in h.frames:
            suffix = "" if index is None else f"#{index}"
            out.append(
                Item(
                    src + suffix,
                    label,
                    group,
                    split,
                    path=it.path,
                    dicom=dicom_render.DicomRef(it.path, index, h.syntax, h.tags),
                    sort_key=dicom.Hasher.order(rel + suffix),
                    group_sort=None if raw is None else dicom.Hasher.order(f"{key_name}\0{raw}"),
                )
            )
    return out


def scan_dicom(
    root: Path,
    opts: dicom.DicomOptions,
    hasher: dicom.Hasher,
    stats: dict,
    *,
    labels: Path | None,
    max_pixels: int,
    workers: int | None,
) -> tuple[list[Item], list[str], set[str]]:
    if labels is None:
        scan = scan_folder(root, None, say_names=False)
        base, classes, provided = list(scan.items), scan.classes, scan.provided
        items = _expand_dicom(base, opts, hasher, stats, max_pixels=max_pixels, workers=workers, class_folders=True)
        kept = {it.label for it in items if it.label is not None}
        return items, [c for c in classes if c in kept] or classes, provided
    kind, table = _read_dicom_labels(labels)
    base = [Item(f.relative_to(root).as_posix(), None, None, None, path=f) for f in list_files(root)]
    hits: Counter = Counter()
    items = _expand_dicom(
        base, opts, hasher, stats, max_pixels=max_pixels, workers=workers, lookup=(kind, table, hits)
    )
    stats["labels_csv"] = {
        "key": kind,
        "rows": len(table),
        "rows_matched": sum(1 for k in table if hits[k]),
        "files_not_in_csv": sum(1 for it in items if it.split == "unlabeled"),
    }
    if stats["files"] and not hits:
        raise DatasetError(f"no row of the labels CSV {labels} matches a DICOM file under {root} (key: {kind})")
    labelled = {it.label for it in items if it.label is not None}
    numeric = all(re.fullmatch(r"-?\d+", x) for x in labelled)
    classes = sorted(labelled, key=(lambda x: int(x)) if numeric else None)
    return items, classes, {it.split for it in items if it.split in ("train", "val", "test")}


def scan_dicom_unlabeled(udir: Path, opts, hasher, stats, *, max_pixels: int, workers: int | None) -> list[Item]:
    base = list(scan_unlabeled(udir, None, prefix="unlabeled:"))
    return _expand_dicom(base, opts, hasher, stats, max_pixels=max_pixels, workers=workers)
