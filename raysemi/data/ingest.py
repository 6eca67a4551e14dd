"""``raysemi ingest``: an image folder, a MedMNIST-style ``.npz`` or a CSV -> validated, deduplicated,
group-split Parquet shards with a manifest (the data contract in ``shards.py``).

Sources:

* **folder**: one subfolder per class (``ROOT/<class>/**``), optionally under split folders
  (``ROOT/{train,val,test}/<class>/**``); a top-level ``ROOT/unlabeled/**`` holds unlabeled images.
* **npz**: ``train_images`` + ``train_labels`` (and ``val_*``, ``test_*``, ``unlabeled_images``), uint8
  ``NxHxW`` or ``NxHxWxC``; class names from a ``label_names`` or ``classes`` key, else ``"0".."C-1"``.
* **csv**: rows ``path,label[,group]`` (a header naming ``path,label,group[,split]`` is optional); paths
  are relative to the CSV's folder; an empty label makes the row unlabeled.

Everything that can be checked is checked before anything is written (source, format, keys, paths,
destination writable, bucket exists); every image is decoded once (``validate.check_image``); failures go to
the manifest's quarantine list; exact copies (same sha256) are stored once and counted. A failure while
writing removes the shards written so far; the manifest is written last, so a partial dataset never looks
complete. Ids are the sha256 of the original bytes, stable across re-ingests.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import random
import re
import sys
import threading
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from raysemi.data import shards
from raysemi.data.shards import SPLITS, DatasetError, Manifest, ShardInfo, SplitInfo
from raysemi.data.validate import DEFAULT_MAX_PIXELS, Checked, check_image, encode_array

log = logging.getLogger(__name__)

FORMATS = ("auto", "folder", "npz", "csv")
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PART = re.compile(r"part-\d+\.parquet(\.tmp-[0-9a-f]+)?$")


@dataclass
class _Item:
    source: str  # relative path, "npz:train:12" or "unlabeled:<relpath>"
    label: str | None
    group: str | None
    split: str | None  # split named by the source, or None (carved by fraction)
    path: Path | None = None
    array: np.ndarray | None = None
    sha: str = ""
    check: Checked | None = None
    keep: bytes | None = None  # stored bytes held in memory (converted or generated); else re-read
    nbytes: int = 0


def _visible(p: Path) -> bool:
    return not p.name.startswith((".", "_"))


def _files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _group_of(name: str, regex: re.Pattern | None) -> str | None:
    if regex is None:
        return None
    m = regex.search(name)
    return None if m is None else (m.group(1) if regex.groups else m.group(0))


def _scan_folder(root: Path, regex) -> tuple[list[_Item], list[str], set[str]]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_DIRS]
    items: list[_Item] = []
    if split_dirs:
        others = [p.name for p in subdirs if p not in split_dirs and p.name != "unlabeled"]
        if others:
            raise DatasetError(
                f"{root} mixes split folders (train/val/test) with other folders: {', '.join(others)}"
            )
        layout = [(_SPLIT_DIRS[p.name.lower()], p) for p in split_dirs]
    else:
        layout = [(None, root)]
    classes: set[str] = set()
    for split, base in layout:
        for cdir in sorted(p for p in base.iterdir() if p.is_dir() and _visible(p)):
            if split is None and cdir.name == "unlabeled":
                continue
            classes.add(cdir.name)
            for f in _files(cdir):
                rel = f.relative_to(root).as_posix()
                items.append(_Item(rel, cdir.name, _group_of(f.name, regex), split, path=f))
    if (root / "unlabeled").is_dir():
        items += _scan_unlabeled(root / "unlabeled", regex)
    if not classes:
        raise DatasetError(f"{root} has no class subfolders (expected {root}/<class>/<image files>)")
    return items, sorted(classes), {s for s, _ in layout if s}


def _scan_unlabeled(root: Path, regex) -> list[_Item]:
    return [
        _Item(
            f"unlabeled:{f.relative_to(root).as_posix()}", None, _group_of(f.name, regex), "unlabeled", path=f
        )
        for f in _files(root)
    ]


def _scan_npz(path: Path) -> tuple[list[_Item], list[str], set[str]]:
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except Exception as err:
        raise DatasetError(f"{path} is not a readable .npz file ({err})") from None
    if "train_images" not in keys:
        raise DatasetError(f"{path} has no 'train_images' key (it has: {', '.join(sorted(keys)) or 'none'})")
    items: list[_Item] = []
    max_label = -1
    provided = set()
    for split in ("train", "val", "test", "unlabeled"):
        if f"{split}_images" not in keys:
            continue
        images = npz[f"{split}_images"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DatasetError(
                f"{path}: '{split}_images' is {images.dtype} {images.shape}, expected uint8 NxHxW[xC]"
            )
        labels = None
        if split != "unlabeled":
            if f"{split}_labels" not in keys:
                raise DatasetError(f"{path} has '{split}_images' but no '{split}_labels' key")
            labels = np.asarray(npz[f"{split}_labels"])
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
            items.append(_Item(f"npz:{split}:{i}", label, None, split, array=images[i]))
    names_key = next((k for k in ("label_names", "classes") if k in keys), None)
    if names_key:
        classes = [str(c) for c in np.asarray(npz[names_key]).ravel()]
        if len(classes) <= max_label:
            raise DatasetError(
                f"{path}: '{names_key}' names {len(classes)} classes but a label is {max_label}"
            )
    else:
        classes = [str(c) for c in range(max_label + 1)]
    for it in items:
        if it.label is not None:
            it.label = classes[it.label]
    return items, classes, provided


def _scan_csv(path: Path, regex) -> tuple[list[_Item], list[str], set[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r) and not r[0].startswith("#")]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read CSV {path}: {err}") from None
    cols = {"path": 0, "label": 1, "group": 2, "split": None}
    first = [c.strip().lower() for c in rows[0]] if rows else []
    if "path" in first:
        cols = {k: (first.index(k) if k in first else None) for k in cols}
        if cols["label"] is None:
            raise DatasetError(f"CSV {path} has a header without a 'label' column")
        rows = rows[1:]
    if not rows:
        raise DatasetError(f"CSV {path} has no rows")
    base = path.parent
    items, missing, labels = [], [], set()
    for n, row in enumerate(rows, start=1):

        def cell(key, row=row):
            i = cols[key]
            return row[i].strip() if i is not None and i < len(row) else ""

        rel = cell("path")
        if len(row) < 2 or not rel:
            raise DatasetError(f"CSV {path} row {n} is not 'path,label[,group]': {','.join(row)}")
        f = Path(rel) if Path(rel).is_absolute() else base / rel
        if not f.is_file():
            missing.append(rel)
            continue
        label = cell("label") or None
        split = cell("split").lower() or None
        if split is not None and split not in ("train", "val", "test", "unlabeled"):
            raise DatasetError(f"CSV {path} row {n}: unknown split {split!r}")
        split = "unlabeled" if label is None else split
        group = cell("group") or _group_of(f.name, regex)
        if label is not None:
            labels.add(label)
        items.append(_Item(rel, label, group, split, path=f))
    if missing:
        raise DatasetError(f"CSV {path} names {len(missing)} missing file(s), e.g. {missing[0]}")
    numeric = all(re.fullmatch(r"-?\d+", x) for x in labels)
    classes = sorted(labels, key=(lambda x: int(x)) if numeric else None)
    return items, classes, {it.split for it in items if it.split in ("train", "val", "test")}


def _detect(source: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    if not source.exists():
        raise DatasetError(f"source {source} does not exist")
    if fmt != "auto":
        return fmt
    if source.is_dir():
        return "folder"
    suffix = source.suffix.lower()
    if suffix in (".npz", ".csv"):
        return suffix[1:]
    raise DatasetError(f"unknown source format: {source} (expected an image folder, a .npz or a .csv file)")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_destination(dest: str, overwrite: bool, sources: list[Path]) -> None:
    """Refuse an existing dataset (unless overwrite) and prove the destination writable, writing nothing
    that stays."""
    fs, root = shards.filesystem(dest)
    if not shards.is_remote(dest):
        d = Path(root).resolve()
        if d.exists() and not d.is_dir():
            raise DatasetError(f"destination {dest} exists and is not a folder")
        for src in sources:
            if (src.is_dir() and _inside(d, src)) or any(_inside(src, d / s) for s in SPLITS):
                raise DatasetError(f"destination {dest} overlaps the source {src}")
    try:
        exists = shards.dataset_exists(dest)
    except PermissionError as err:
        raise DatasetError(f"cannot access destination {dest}: access denied ({err})") from None
    except Exception as err:
        raise DatasetError(f"cannot access destination {dest}: {type(err).__name__}: {err}") from None
    if exists and not overwrite:
        raise DatasetError(f"{dest} already holds a dataset (manifest.json); pass --overwrite to replace it")
    probe = f"{root.rstrip('/')}/.raysemi-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except FileNotFoundError as err:
        where = f"bucket {root.split('/')[0]!r} does not exist" if shards.is_remote(dest) else str(err)
        raise DatasetError(f"cannot write to {dest}: {where}") from None
    except PermissionError as err:
        raise DatasetError(f"cannot write to {dest}: access denied ({err})") from None
    except Exception as err:
        raise DatasetError(f"cannot write to {dest}: {type(err).__name__}: {err}") from None


def _clear_parts(dest: str) -> None:
    """Remove shard files (and temporaries) under the split folders: leftovers of an unfinished ingest."""
    fs, root = shards.filesystem(dest)
    fs.invalidate_cache()
    for split in SPLITS:
        sdir = f"{root.rstrip('/')}/{split}"
        try:
            names = fs.ls(sdir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        doomed = [n for n in names if _PART.match(n.rsplit("/", 1)[-1])]
        if doomed:
            fs.rm(doomed)
        if isinstance(fs, LocalFileSystem) and fs.exists(sdir) and not fs.ls(sdir):
            fs.rmdir(sdir)


def _read(it: _Item) -> bytes:
    if it.path is not None:
        return it.path.read_bytes()
    return encode_array(it.array)


def _validate(it: _Item, max_pixels: int) -> _Item:
    try:
        data = _read(it)
    except OSError as err:
        it.check = Checked(reason=f"unreadable: {type(err).__name__}")
        return it
    it.sha = shards.image_id(data)
    it.check = check_image(data, max_pixels=max_pixels)
    if it.check.ok:
        it.nbytes = len(it.check.data)
        it.keep = it.check.data if (it.path is None or it.check.conversion) else None
        it.check = Checked(conversion=it.check.conversion, mode=it.check.mode, size=it.check.size)
        it.array = None
    return it


def _carve(items: list[_Item], carve: dict[str, float], seed: int) -> None:
    """Move whole groups from the labeled train pool into val/test, stratified by each group's majority class."""
    pool = [it for it in items if it.label is not None and it.split in (None, "train")]
    for it in pool:
        it.split = "train"
    groups: dict[str, list[_Item]] = defaultdict(list)
    for it in pool:
        groups[it.group if it.group is not None else f"\0{it.source}"].append(it)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_class[Counter(m.label for m in members).most_common(1)[0][0]].append(key)
    rng = random.Random(seed)
    for cls in sorted(by_class):
        keys = sorted(by_class[cls])
        rng.shuffle(keys)
        n = sum(len(groups[k]) for k in keys)
        targets = {s: round(n * f) for s, f in carve.items()}
        counts = dict.fromkeys(carve, 0)
        for k in keys:
            size = len(groups[k])
            for s, t in targets.items():
                if counts[s] < t and abs(counts[s] + size - t) <= t - counts[s]:
                    counts[s] += size
                    for it in groups[k]:
                        it.split = s
                    break


def _plan(items: list[_Item], shard_mb: float, min_shards: int, seed: int) -> list[list[_Item]]:
    if not items:
        return []
    rows = sorted(items, key=lambda it: it.source)
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    total = sum(it.nbytes for it in rows)
    k = min(len(rows), max(1, math.ceil(total / (shard_mb * 1e6)), min(min_shards, len(rows))))
    bounds = np.linspace(0, len(rows), k + 1).round().astype(int)
    return [rows[a:b] for a, b in itertools.pairwise(bounds)]


def _shard_table(rows: list[_Item], class_index: dict[str, int]) -> pa.Table:
    images = []
    for it in rows:
        if it.keep is not None:
            images.append(it.keep)
            continue
        data = _read(it)
        if shards.image_id(data) != it.sha:
            raise DatasetError(f"{it.path} changed during ingest; run it again")
        images.append(data)
    return pa.table(
        {
            "id": [it.sha for it in rows],
            "image": images,
            "label": pa.array(
                [None if it.label is None else class_index[it.label] for it in rows], pa.int16()
            ),
            "group": pa.array([it.group for it in rows], pa.string()),
            "source": [it.source for it in rows],
        },
        schema=shards.SCHEMA,
    )


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="img", disable=not (progress and sys.stderr.isatty()), leave=False
    )


def ingest(
    source: str,
    dest: str,
    *,
    fmt: str = "auto",
    shard_mb: float = 64.0,
    min_shards: int = 4,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    group_regex: str | None = None,
    unlabeled: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    synthetic: bool = False,
    workers: int | None = None,
) -> Manifest:
    """Ingest ``source`` (folder / .npz / .csv, local) into the dataset at ``dest`` (local path or s3://).

    Raises ``DatasetError`` (one line) for bad input; writes no manifest unless everything succeeded.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(f"val/test fractions {val_fraction}, {test_fraction} must be >= 0 and sum below 1")
    if shard_mb <= 0 or min_shards < 1 or max_pixels < 1:
        raise DatasetError("shard_mb, min_shards and max_pixels must be positive")
    try:
        regex = re.compile(group_regex) if group_regex else None
    except re.error as err:
        raise DatasetError(f"bad group regex {group_regex!r}: {err}") from None
    if shards.is_remote(str(source)):
        raise DatasetError(f"source {source} must be a local path (copy it down first)")
    src = Path(source).expanduser().resolve()
    kind = _detect(src, fmt)
    if kind == "folder":
        items, classes, provided = _scan_folder(src, regex)
    elif kind == "npz":
        items, classes, provided = _scan_npz(src)
    else:
        items, classes, provided = _scan_csv(src, regex)
    sources = [src]
    if unlabeled:
        udir = Path(unlabeled).expanduser().resolve()
        if not udir.is_dir():
            raise DatasetError(f"unlabeled folder {unlabeled} does not exist")
        items += _scan_unlabeled(udir, regex)
        sources.append(udir)
    if not items:
        raise DatasetError(f"no image files found in {source}")
    if regex is not None and kind != "npz" and all(it.group is None for it in items):
        raise DatasetError(f"group regex {group_regex!r} matches none of the {len(items)} file names")
    _check_destination(dest, overwrite, sources)

    with (
        ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2)) as pool,
        _bar(len(items), "validate", progress) as bar,
    ):
        futures = [pool.submit(_validate, it, max_pixels) for it in items]
        for f in as_completed(futures):
            f.result()
            bar.update()

    quarantine = [{"source": it.source, "reason": it.check.reason} for it in items if not it.check.ok]
    kept, first, duplicates = [], {}, 0
    for it in sorted((it for it in items if it.check.ok), key=lambda it: (it.label is None, it.source)):
        prev = first.setdefault(it.sha, it)
        if prev is it:
            kept.append(it)
        elif it.label is None or it.label == prev.label:
            duplicates += 1
        else:
            quarantine.append(
                {"source": it.source, "reason": f"duplicate with conflicting label (of {prev.source})"}
            )
    if not kept:
        first_bad = quarantine[0] if quarantine else {"source": "-", "reason": "-"}
        raise DatasetError(
            f"no valid images in {source}: all {len(items)} were rejected "
            f"(e.g. {first_bad['source']}: {first_bad['reason']})"
        )
    carve = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in provided and f > 0}
    _carve(kept, carve, seed)
    for it in kept:
        it.split = it.split or "train"
    by_split = {s: [it for it in kept if it.split == s] for s in SPLITS}
    plan = [
        (s, i, rows) for s in SPLITS for i, rows in enumerate(_plan(by_split[s], shard_mb, min_shards, seed))
    ]
    class_index = {c: i for i, c in enumerate(classes)}

    if overwrite and shards.dataset_exists(dest):
        shards.remove_dataset(dest)
    written: dict[tuple[str, int], ShardInfo] = {}
    lock = threading.Lock()

    def write(split: str, i: int, rows: list[_Item]) -> int:
        info = shards.write_shard(dest, f"{split}/part-{i:05d}.parquet", _shard_table(rows, class_index))
        with lock:
            written[(split, i)] = info
        return len(rows)

    try:
        _clear_parts(dest)
        with (
            ThreadPoolExecutor(4 if shards.is_remote(dest) else 2) as pool,
            _bar(len(kept), "write", progress) as bar,
        ):
            futures = [pool.submit(write, *p) for p in plan]
            try:
                for f in as_completed(futures):
                    bar.update(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        splits = {}
        for s in SPLITS:
            counts = Counter(it.label for it in by_split[s] if it.label is not None)
            splits[s] = SplitInfo(
                rows=len(by_split[s]),
                labeled=sum(counts.values()),
                label_counts={c: counts.get(c, 0) for c in classes} if s != "unlabeled" else {},
                shards=[written[(s, i)] for s2, i, _ in plan if s2 == s],
            )
        converted = Counter(it.check.conversion for it in kept if it.check.conversion)
        manifest = Manifest(
            classes=classes,
            splits=splits,
            quarantine=quarantine,
            duplicates=duplicates,
            source=str(src),
            synthetic=synthetic,
            extra={
                "format": kind,
                "inputs": len(items),
                "converted": dict(sorted(converted.items())),
                "splits_from_source": sorted(provided),
                "carved": carve,
                "group_regex": group_regex,
                "groups_unmatched": sum(1 for it in items if regex is not None and it.group is None),
                "unlabeled_dir": str(Path(unlabeled).expanduser().resolve()) if unlabeled else None,
                "seed": seed,
                "shard_mb": shard_mb,
                "min_shards": min_shards,
                "max_pixels": max_pixels,
            },
        )
        shards.write_manifest(dest, manifest)
    except BaseException as err:
        try:
            _clear_parts(dest)
        except Exception as cleanup_err:  # the original error is the one to report
            log.warning("could not remove partial shards at %s: %s", dest, cleanup_err)
        if isinstance(err, OSError):
            raise DatasetError(f"writing {dest} failed: {type(err).__name__}: {err}") from err
        raise
    return manifest


def summarize(manifest: Manifest) -> str:
    """A few lines for the CLI: rows per split, quarantined, duplicates, conversions."""
    stored = sum(s.rows for s in manifest.splits.values())
    tag = " [SYNTHETIC]" if manifest.synthetic else ""
    lines = [f"{stored:,} images stored, {manifest.num_classes} classes: {', '.join(manifest.classes)}{tag}"]
    for name, s in manifest.splits.items():
        if s.rows == 0 and name == "unlabeled":
            continue
        per = ", ".join(f"{c} {n:,}" for c, n in s.label_counts.items())
        lines.append(
            f"  {name:<9} {s.rows:>7,} rows in {len(s.shards)} shards" + (f" ({per})" if per else "")
        )
    reasons = Counter(q["reason"].split(" (")[0] for q in manifest.quarantine)
    detail = "; ".join(f"{r}: {n}" for r, n in reasons.most_common())
    lines.append(f"quarantined: {len(manifest.quarantine)}" + (f" ({detail})" if detail else ""))
    lines.append(f"duplicates dropped: {manifest.duplicates}")
    converted = manifest.extra.get("converted") or {}
    if converted:
        lines.append("converted: " + "; ".join(f"{k}: {n}" for k, n in converted.items()))
    return "\n".join(lines)
