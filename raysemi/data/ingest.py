"""``raysemi ingest``: an image folder, a MedMNIST-style ``.npz``, a CSV or a DICOM tree -> validated,
deduplicated, group-split Parquet shards with a manifest (the data contract in ``shards.py``).

The steps, each in its own module: scan the source (``sources.py``; DICOM reading and rendering in
``dicom.py``), check the destination (``destination.py``), validate every image (here), dedup, carve
val/test by group and plan the shards (``partition.py``), write them (``shard_writer.py``), then the manifest.
DICOM frames are rendered once at validation into a temporary folder (removed at the end) and read back
when their shard is written; their id is the sha256 of the stored PNG.

Everything that can be checked is checked before anything is written (source, format, keys, paths,
destination writable, bucket exists); every image is decoded once (``validate.check_image``); failures go to
the manifest's quarantine list; exact copies (same sha256) are stored once and counted. A failure while
writing removes the shards written so far; the manifest is written last, so a partial dataset never looks
complete. Ids are the sha256 of the original bytes, stable across re-ingests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from raysemi import io as rio
from raysemi.data import dicom, dicom_render, shards
from raysemi.data.destination import check_destination, clear_parts, remove_if_empty
from raysemi.data.dicom import DicomOptions
from raysemi.data.dicom_sources import scan_dicom, scan_dicom_unlabeled
from raysemi.data.partition import carve_group_splits, dedup, plan_shards
from raysemi.data.shard_writer import progress_bar, read_item, write_shards
from raysemi.data.shards import SPLITS, DatasetError, Manifest, SplitInfo
from raysemi.data.sources import (
    FORMATS,
    Item,
    detect_format,
    quarantine_escaping,
    scan_csv,
    scan_folder,
    scan_npz,
    scan_unlabeled,
    source_trees,
)
from raysemi.data.validate import DEFAULT_MAX_PIXELS, Checked, check_image, encode_array
from raysemi.outputs import DATASET, mark

__all__ = ["FORMATS", "DicomOptions", "ingest", "summarize"]  # FORMATS: re-exported from sources

log = logging.getLogger(__name__)

def _render_dicom(it: Item, window: tuple[float, float] | None, spill: Path) -> Item:
    """Render a DICOM frame to an 8-bit PNG in the spill folder; ``it.path`` then points at it."""
    try:
        arr, conversion = dicom_render.render(it.dicom, window)
    except dicom.DicomReject as bad:
        it.check = Checked(reason=bad.reason)
        return it
    data = encode_array(arr)
    it.sha, it.nbytes = shards.image_id(data), len(data)
    target = spill / f"{it.sha}.png"
    if not target.exists():  # identical frames render to one file; the rename makes concurrent writes safe
        tmp = spill / f"{it.sha}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    it.path, it.keep = target, None
    mode = "L" if arr.ndim == 2 else "RGB"
    it.check = Checked(conversion=conversion, mode=mode, size=(arr.shape[1], arr.shape[0]))
    return it


def _validate(it: Item, max_pixels: int, dicom_run: tuple | None = None) -> Item:
    if it.check is not None:
        return it  # quarantined by the scan (DICOM headers)
    if it.dicom is not None:
        return _render_dicom(it, *dicom_run)
    try:
        data = read_item(it)
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


def _collect(
    source: str,
    fmt: str,
    regex: re.Pattern | None,
    unlabeled: str | None,
    *,
    opts: DicomOptions | None,
    labels: str | None,
    hasher: dicom.Hasher | None,
    max_pixels: int,
    workers: int | None,
    stack: contextlib.ExitStack,
):
    """Scan the source (and the unlabeled folder): every input as an item, nothing decoded yet (DICOM:
    headers read). Returns (kind, items, classes, provided splits, source paths, DICOM stats or None,
    DICOM options or None)."""
    if rio.is_remote(str(source)):
        raise DatasetError(f"source {source} must be a local path (copy it down first)")
    src = Path(source).expanduser().resolve()
    kind = detect_format(src, fmt)
    udir = Path(unlabeled).expanduser().resolve() if unlabeled else None
    if udir is not None and not udir.is_dir():
        raise DatasetError(f"unlabeled folder {unlabeled} does not exist")
    udicom = udir is not None and dicom.looks_like_dicom(udir)
    if kind != "dicom" and not udicom and opts is not None:
        raise DatasetError("DICOM options (--frames, --window, --keep-tags, ...) apply to DICOM sources only")
    if labels and kind != "dicom":
        raise DatasetError("--labels applies to DICOM sources (for images use a CSV source)")
    stats = None
    if kind == "dicom" or udicom:
        if regex is not None:
            raise DatasetError("--group-regex does not apply to DICOM: the group is the PatientID (--dicom-group)")
        stats = {"files": 0, "skipped": {}, "missing_group_key": {"quarantined": 0, "unlabeled_kept": 0}}
        stack.enter_context(dicom.quiet())  # also the one place that says "install raysemi[dicom]"
        opts = opts or DicomOptions()
    dicom_kw = {"max_pixels": max_pixels, "workers": workers}
    if kind == "dicom":
        label_csv = Path(labels).expanduser().resolve() if labels else None
        if label_csv is not None and not label_csv.is_file():
            raise DatasetError(f"labels CSV {labels} does not exist")
        items, classes, provided = scan_dicom(src, opts, hasher, stats, labels=label_csv, **dicom_kw)
    else:
        scan = {
            "folder": lambda: scan_folder(src, regex),
            "npz": lambda: scan_npz(src),
            "csv": lambda: scan_csv(src, regex),
        }
        items, classes, provided = scan[kind]()
    sources = [src]
    if udir is not None:
        if udicom:
            items += scan_dicom_unlabeled(udir, opts, hasher, stats, **dicom_kw)
        else:
            items += scan_unlabeled(udir, regex, prefix="unlabeled:")
        sources.append(udir)
    if stats is not None and stats["files"] == 0 and kind == "dicom":
        raise DatasetError(f"no DICOM files in {source} (none has the DICOM preamble 'DICM' at byte 128)")
    if not items:
        raise DatasetError(f"no image files found in {source}")
    if kind == "dicom" and not classes:
        raise DatasetError(f"no labelled DICOM files in {source}")
    if regex is not None and kind != "npz" and all(it.group is None for it in items):
        raise DatasetError(f"group regex {regex.pattern!r} matches none of the {len(items)} file names")
    return kind, items, classes, provided, sources, stats, opts


def _validate_all(
    items: list[Item], max_pixels: int, workers: int | None, progress: bool, dicom_run: tuple | None = None
) -> None:
    # Threads: Pillow releases the GIL while decoding (a process pool measured no faster on 224px JPEGs).
    with (
        ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2)) as pool,
        progress_bar(len(items), "validate", progress) as bar,
    ):
        for f in as_completed([pool.submit(_validate, it, max_pixels, dicom_run) for it in items]):
            f.result()
            bar.update()


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
    dicom_options: DicomOptions | None = None,
    labels: str | None = None,
    follow_symlinks: bool = False,
) -> Manifest:
    """Ingest ``source`` (folder / .npz / .csv / DICOM tree, local) into the dataset at ``dest`` (local path
    or s3://).

    Raises ``DatasetError`` (one line) for bad input; writes no manifest unless everything succeeded.
    ``synthetic`` marks the manifest as synthetic data; ``workers`` sets the decode threads.
    ``dicom_options`` (frames, window, group key, salt, kept tags...; defaults when None) and ``labels`` (a
    CSV keyed on path, SOPInstanceUID or StudyInstanceUID) apply to DICOM sources only.
    A symbolic link out of the source folder (or the unlabeled one) is quarantined unread, with its reason,
    unless ``follow_symlinks``; links within them are followed.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(f"val/test fractions {val_fraction}, {test_fraction} must be >= 0 and sum below 1")
    if shard_mb <= 0 or min_shards < 1 or max_pixels < 1:
        raise DatasetError("shard_mb, min_shards and max_pixels must be positive")
    try:
        regex = re.compile(group_regex) if group_regex else None
    except re.error as err:
        raise DatasetError(f"bad group regex {group_regex!r}: {err}") from None
    opts = dicom_options.checked() if dicom_options is not None else None
    hasher = dicom.Hasher(opts.salt if opts else None)
    # The stack holds, for DICOM only, pydicom silenced and the folder of rendered frames, until the end.
    with contextlib.ExitStack() as stack:
        trees = [Path(p).expanduser().resolve() for p in (source, unlabeled) if p]
        trees = [t if t.is_dir() else t.parent for t in trees]  # a CSV's paths are relative to its folder
        stack.enter_context(source_trees(None if follow_symlinks else trees))
        kind, items, classes, provided, sources, stats, opts = _collect(
            source, fmt, regex, unlabeled, opts=opts, labels=labels, hasher=hasher,
            max_pixels=max_pixels, workers=workers, stack=stack,
        )
        quarantine_escaping(items)  # links out of the source folder: listed with the reason, never read
        dicom_run = None
        # An export's own folder can be named after its patient: for DICOM, paths are stored only on request.
        shown = [str(p) for p in sources]
        if stats is not None and not opts.keep_paths:
            shown = ["(DICOM export; path not stored without --keep-paths)"] * len(sources)
        if stats is not None:
            dicom_run = (opts.window, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="raysemi-dicom-"))))
        created = check_destination(dest, overwrite, sources)
        try:
            _validate_all(items, max_pixels, workers, progress, dicom_run)
            kept, quarantine, duplicates = dedup(items)
            if not kept:
                bad = quarantine[0]
                raise DatasetError(
                    f"no valid images in {source}: all {len(items)} were rejected "
                    f"(e.g. {bad['source']}: {bad['reason']})"
                )
            carve = {
                s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in provided and f > 0
            }
            carve_group_splits(kept, carve, seed)
            by_split = {s: [it for it in kept if it.split == s] for s in SPLITS}
            sides = defaultdict(set)
            for it in kept:
                if it.group is not None and it.split != "unlabeled":
                    sides[it.group].add(it.split)
            spanning = sum(1 for v in sides.values() if len(v) > 1)  # only possible with splits from the source
            if spanning:
                log.warning("%d groups appear in more than one of the source's own splits", spanning)
            plan = [
                (s, i, rows)
                for s in SPLITS
                for i, rows in enumerate(plan_shards(by_split[s], shard_mb, min_shards, seed))
            ]
            try:
                if overwrite and shards.dataset_exists(dest):
                    # only now: a source that fails validation leaves the old one intact
                    shards.remove_dataset(dest)
                mark(dest, DATASET)
                clear_parts(dest)
                tags = opts.keep_tags if opts is not None else ()
                written = write_shards(dest, plan, {c: i for i, c in enumerate(classes)}, progress, tags)
                splits = {}
                for s in SPLITS:
                    counts = Counter(it.label for it in by_split[s] if it.label is not None)
                    splits[s] = SplitInfo(
                        rows=len(by_split[s]),
                        labeled=sum(counts.values()),
                        label_counts={c: counts.get(c, 0) for c in classes} if s != "unlabeled" else {},
                        shards=[written[(s, i)] for s2, i, _ in plan if s2 == s],
                    )
                manifest = Manifest(
                    classes=classes,
                    splits=splits,
                    quarantine=quarantine,
                    duplicates=duplicates,
                    source=shown[0],
                    synthetic=synthetic,
                    extra={
                        "format": kind,
                        "inputs": len(items),
                        "converted": dict(
                            sorted(Counter(it.check.conversion for it in kept if it.check.conversion).items())
                        ),
                        "splits_from_source": sorted(provided),
                        "carved": carve,
                        "group_regex": group_regex,
                        "groups_across_splits": spanning,
                        "groups_unmatched": sum(1 for it in items if regex is not None and it.group is None),
                        "unlabeled_dir": shown[1] if unlabeled else None,
                        "dicom": None
                        if stats is None
                        else dicom.manifest_entry(opts, stats, [it.dicom for it in kept if it.dicom is not None]),
                        "seed": seed,
                        "shard_mb": shard_mb,
                        "min_shards": min_shards,
                        "max_pixels": max_pixels,
                    },
                )
                shards.write_manifest(dest, manifest)  # last: only a complete dataset has one
            except BaseException as err:
                left = _undo_partial(dest)
                problem = None if isinstance(err, DatasetError) or not isinstance(err, Exception) else \
                    rio.storage_problem(err)
                if problem is not None:  # the storage failed (S3 down, silent, refusing; a disk error)
                    raise DatasetError(f"writing {dest} failed: {problem}; {left}") from err
                if not left.startswith("no shard"):
                    log.warning("%s", left)
                raise
        except OSError as err:
            remove_if_empty(dest, created)
            raise DatasetError(f"writing {dest} failed: {rio.storage_problem(err)}") from err
        except BaseException:
            remove_if_empty(dest, created)
            raise
        log.info(
            "ingested %s -> %s: %d stored, %d quarantined, %d duplicates",
            shown[0],
            dest,
            len(kept),
            len(quarantine),
            duplicates,
        )
        return manifest


def _undo_partial(dest: str) -> str:
    """Remove the shards of a failed ingest; says what is left behind."""
    try:
        clear_parts(dest)
    except Exception as err:  # the storage may be what failed: the original error is the one to report
        return (f"partial shards may be left under {dest}/<split>/ (removing them failed too: {type(err).__name__}); "
                "without a manifest.json no command takes them for a dataset, and the next ingest to this "
                "destination removes them")
    return "no shard was left behind"


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
    d = manifest.extra.get("dicom")
    if d:
        skipped = ", ".join(f"{k} {n}" for k, n in d["skipped"].items()) or "none"
        lines.append(
            f"DICOM: {d['files']} files (skipped: {skipped}); groups: salted hash of {d['group_key']}; "
            f"frames: {d['frames']}; rules: " + "; ".join(f"{r}: {n}" for r, n in d["rules"].items())
        )
    return "\n".join(lines)
