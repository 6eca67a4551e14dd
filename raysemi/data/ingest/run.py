"""``raysemi ingest``: an image folder, a MedMNIST-style ``.npz`` or a CSV (local or on S3), or a local DICOM
tree -> validated, deduplicated, group-split Parquet shards with a manifest (the data contract in ``shards.py``).

The steps: scan the source as a stream (``ingest/sources.py`` over ``data/sources.py``'s listing; DICOM headers in ``dicom/sources.py``), check the
destination (``destination.py``), then, as tasks of a ``Mapper`` (in this process, or Ray tasks spread over
the cluster: ``ray_tasks.task_mapper``), a bounded window of chunks at a time:

1. stage: every input of a chunk read once, validated (decoded) once, written with what is to be stored to a
   staging folder (in the destination when tasks run on a cluster, else a local temporary one:
   ``chunks.stage_chunk``);
2. plan: dedup, carve val/test by group, plan the shards (``partition.py``) over the small columns of every
   staged part, in one task; the quarantine list goes to ``quarantine.parquet``;
3. scatter the kept rows of each staged part by destination shard, then gather each shard in planned order;
4. the manifest, last, with per-shard and per-class counts and the quarantine's counts by reason.

The driver holds a window of chunks of the scan and per-chunk / per-shard numbers, never a list of every
input. Everything that can be checked up front is (source, format, keys, paths, destination writable, bucket
exists); a failure removes the shards written so far and the staging folder; the manifest is written last,
so a partial dataset never looks complete. Ids are the sha256 of the original bytes, stable across re-ingests.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raysemi.core import io as rio
from raysemi.core.console import progress as progress_bar
from raysemi.core.outputs import DATASET, mark
from raysemi.data import shards
from raysemi.data.ingest.chunks import (
    Staged,
    default_threads,
    gather_shard,
    plan_dataset,
    scatter_chunk,
    stage_chunk,
)
from raysemi.data.ingest.destination import (
    STAGING,
    check_destination,
    clear_parts,
    remove_if_empty,
    remove_staging,
    undo_partial,
)
from raysemi.data.ingest.dicom import read as dicom
from raysemi.data.ingest.dicom.read import DicomOptions
from raysemi.data.ingest.dicom.sources import scan_dicom, scan_dicom_unlabeled
from raysemi.data.ingest.sources import (
    FORMATS,
    Item,
    Scan,
    detect_format,
    scan_csv,
    scan_folder,
    scan_npz,
    scan_unlabeled,
)
from raysemi.data.ingest.validate import DEFAULT_MAX_PIXELS
from raysemi.data.shards import QUARANTINE, SPLITS, DatasetError, Manifest, Mapper, SplitInfo, local_map
from raysemi.data.sources import current_trees, source_trees

__all__ = ["FORMATS", "DicomOptions", "ingest"]  # FORMATS: re-exported from sources

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # inputs per staging task
IN_FLIGHT = 32  # chunks handed to the mapper at once: bounds the scan the driver holds


@dataclass
class _Source:
    kind: str
    scan: Scan
    sources: list  # the source (and the unlabeled folder), as shown
    stats: dict | None  # DICOM counts, None for images
    opts: DicomOptions | None


def _local(p: str) -> Path | str:
    return p if rio.is_remote(p) else Path(p).expanduser().resolve()


def _open_source(
    source: str, fmt: str, regex: re.Pattern | None, unlabeled: str | None, *, opts: DicomOptions | None,
    labels: str | None, hasher: dicom.Hasher, max_pixels: int, workers: int | None, stack: contextlib.ExitStack,
) -> _Source:
    """Check the source (and the unlabeled folder) and start scanning it: nothing decoded yet (DICOM: the
    headers are read here, the tree being local)."""
    src = _local(source)
    kind = detect_format(src, fmt)
    udir = _local(unlabeled) if unlabeled else None
    if udir is not None and not (rio.exists(udir) if isinstance(udir, str) else udir.is_dir()):
        raise DatasetError(f"unlabeled folder {unlabeled} does not exist")
    udicom = isinstance(udir, Path) and dicom.looks_like_dicom(udir)
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
        if stats["files"] == 0:
            raise DatasetError(f"no DICOM files in {source} (none has the DICOM preamble 'DICM' at byte 128)")
        if not classes:
            raise DatasetError(f"no labelled DICOM files in {source}")
        scan = Scan(iter(items), classes, provided)
    else:
        scan = {"folder": lambda: scan_folder(src, regex), "npz": lambda: scan_npz(src),
                "csv": lambda: scan_csv(src, regex)}[kind]()
    sources = [src]
    if udir is not None:
        extra = scan_dicom_unlabeled(udir, opts, hasher, stats, **dicom_kw) if udicom else \
            scan_unlabeled(udir, regex, prefix="unlabeled:")
        scan = Scan(itertools.chain(scan.items, extra), scan.classes, scan.provided)
        sources.append(udir)
    return _Source(kind, scan, sources, stats, opts)


def _chunks(items: Iterator[Item], rows: int) -> Iterator[list[Item]]:
    while chunk := list(itertools.islice(items, rows)):
        yield chunk


def _stage_all(
    src: _Source, staging: str, regex: re.Pattern | None, map_fn: Mapper, *, max_pixels: int, workers: int | None,
    progress: bool, source: str,
) -> tuple[int, int, int]:
    """Stage the scan, a window of chunks at a time; the scan's own checks once it is exhausted. Returns
    (chunks, inputs, inputs whose name the group regex does not match)."""
    window = (src.opts.window if src.opts else None)
    tags = src.opts.keep_tags if src.opts is not None else ()
    threads = workers or default_threads()
    trees = current_trees()  # links out of the source folders: quarantined by the task, never read
    chunks = inputs = grouped = missing = 0
    example = None
    with progress_bar(None, "validate", unit="img", enabled=progress) as bar:
        pending: list[tuple] = []

        def flush() -> None:
            nonlocal missing, example
            done: list[Staged] = map_fn(stage_chunk, pending)
            for st in done:
                missing += st.missing
                example = example or st.missing_example
                bar.update(st.rows)
            pending.clear()

        for chunk in _chunks(src.scan.items, CHUNK_ROWS):
            inputs += len(chunk)
            grouped += sum(it.group is not None for it in chunk)
            pending.append((chunk, chunks, staging, max_pixels, window, tags, threads, trees))
            chunks += 1
            if len(pending) >= IN_FLIGHT:
                flush()
        if pending:
            flush()
    if missing:
        raise DatasetError(f"CSV {source} names {missing} missing file(s), e.g. {example}")
    if not inputs:
        raise DatasetError(f"no image files found in {source}")
    if regex is not None and src.kind != "npz" and grouped == 0:
        raise DatasetError(f"group regex {regex.pattern!r} matches none of the {inputs} file names")
    return chunks, inputs, (inputs - grouped if regex is not None and src.kind != "npz" else 0)


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
    map_fn: Mapper = local_map,
) -> Manifest:
    """Ingest ``source`` (folder / .npz / .csv, local or s3://; a DICOM tree, local) into the dataset at
    ``dest`` (local path or s3://).

    Raises ``DatasetError`` (one line) for bad input; writes no manifest unless everything succeeded.
    ``synthetic`` marks the manifest as synthetic data; ``workers`` sets the decode threads of a task;
    ``map_fn`` runs the per-chunk and per-shard tasks (``local_map``: in this process).
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
    # The stack holds, for DICOM only, pydicom silenced, until the end.
    with contextlib.ExitStack() as stack:
        trees = [_local(p) for p in (source, unlabeled) if p]
        trees = [t if t.is_dir() else t.parent for t in trees if isinstance(t, Path)]  # a CSV's paths: its folder
        stack.enter_context(source_trees(None if follow_symlinks else trees))
        src = _open_source(source, fmt, regex, unlabeled, opts=opts, labels=labels, hasher=hasher,
                           max_pixels=max_pixels, workers=workers, stack=stack)
        # An export's own folder can be named after its patient: for DICOM, paths are stored only on request.
        shown = [str(p) for p in src.sources]
        if src.stats is not None and not src.opts.keep_paths:
            shown = ["(DICOM export; path not stored without --keep-paths)"] * len(src.sources)
        created = check_destination(dest, overwrite, [p for p in src.sources if isinstance(p, Path)])
        # In this process the staging folder is a local temporary one (an S3 destination then receives only the
        # shards); tasks on a cluster share the destination's.
        local = map_fn is local_map and rio.is_remote(dest)
        staging = (tempfile.mkdtemp(prefix="raysemi-ingest-") if local
                   else rio.join(dest, f"{STAGING}{uuid.uuid4().hex[:8]}"))
        try:
            if not rio.is_remote(staging):
                Path(staging, "staged").mkdir(parents=True)
            manifest = _build(src, dest, staging, regex, map_fn, shown, source=source, shard_mb=shard_mb,
                              min_shards=min_shards, val_fraction=val_fraction, test_fraction=test_fraction,
                              group_regex=group_regex, unlabeled=unlabeled, seed=seed, overwrite=overwrite,
                              max_pixels=max_pixels, progress=progress, synthetic=synthetic, workers=workers)
        except OSError as err:
            remove_staging(staging)
            remove_if_empty(dest, created)
            raise DatasetError(f"writing {dest} failed: {rio.storage_problem(err)}") from err
        except BaseException:
            remove_staging(staging)
            remove_if_empty(dest, created)
            raise
        remove_staging(staging)
        log.info("ingested %s -> %s: %d stored, %d quarantined, %d duplicates", shown[0], dest,
                 sum(s.rows for s in manifest.splits.values()), manifest.quarantined_total, manifest.duplicates)
        return manifest


def _build(src: _Source, dest: str, staging: str, regex, map_fn: Mapper, shown: list[str], *, source: str,
           shard_mb: float, min_shards: int, val_fraction: float, test_fraction: float, group_regex: str | None,
           unlabeled: str | None, seed: int, overwrite: bool, max_pixels: int, progress: bool, synthetic: bool,
           workers: int | None) -> Manifest:
    """Stage, plan, and (once nothing can fail for the input's sake) replace any earlier dataset and write."""
    chunks, inputs, unmatched = _stage_all(src, staging, regex, map_fn, max_pixels=max_pixels, workers=workers,
                                progress=progress, source=source)
    classes = list(src.scan.classes)
    carve = {s: f for s, f in (("val", val_fraction), ("test", test_fraction))
             if s not in src.scan.provided and f > 0}
    quarantine_uri = rio.join(staging, QUARANTINE)
    plan = map_fn(plan_dataset, [(staging, chunks, quarantine_uri, carve, seed, shard_mb, min_shards)])[0]
    if plan.kept == 0:
        where, why = plan.first_failure
        raise DatasetError(f"no valid images in {source}: all {inputs} were rejected (e.g. {where}: {why})")
    if plan.groups_across_splits:
        log.warning("%d groups appear in more than one of the source's own splits", plan.groups_across_splits)
    try:
        if overwrite and shards.dataset_exists(dest):
            shards.remove_dataset(dest)  # only now: a source that fails validation leaves the old one intact
        mark(dest, DATASET)
        clear_parts(dest, keep=staging)
        tags = src.opts.keep_tags if src.opts is not None else ()
        map_fn(scatter_chunk, [(staging, c, plan.row_groups.get(c), tags) for c in range(chunks)])
        jobs = [(s, i, n) for s in SPLITS for i, n in enumerate(plan.sizes[s])]
        written = map_fn(gather_shard, [(staging, dest, s, i, n, classes, tags) for s, i, n in jobs])
        fs, target = rio.filesystem(rio.join(dest, QUARANTINE))
        if rio.is_remote(quarantine_uri) == rio.is_remote(dest):
            fs.copy(rio.filesystem(quarantine_uri)[1], target)  # on S3, a copy on the server
        else:  # staged locally for an S3 destination: an upload
            fs.put_file(quarantine_uri, target)
        splits = {}
        for s in SPLITS:
            counts = plan.label_counts.get(s, {})
            splits[s] = SplitInfo(
                rows=sum(plan.sizes[s]),
                labeled=sum(counts.values()),
                label_counts={c: counts.get(c, 0) for c in classes} if s != "unlabeled" else {},
                shards=[w for (s2, _, _), w in zip(jobs, written) if s2 == s],
            )
        manifest = Manifest(
            classes=classes,
            splits=splits,
            quarantined=plan.quarantined,
            duplicates=plan.duplicates,
            source=shown[0],
            synthetic=synthetic,
            extra={
                "format": src.kind,
                "inputs": inputs,
                "converted": plan.converted,
                "splits_from_source": sorted(src.scan.provided),
                "carved": carve,
                "group_regex": group_regex,
                "groups_across_splits": plan.groups_across_splits,
                "groups_unmatched": unmatched,
                "unlabeled_dir": shown[1] if unlabeled else None,
                "dicom": None if src.stats is None
                else dicom.manifest_entry(src.opts, src.stats, plan.dicom_rules, plan.dicom_syntaxes),
                "seed": seed,
                "shard_mb": shard_mb,
                "min_shards": min_shards,
                "max_pixels": max_pixels,
            },
        )
        shards.write_manifest(dest, manifest)  # last: only a complete dataset has one
        return manifest
    except BaseException as err:
        left = undo_partial(dest)
        problem = None if isinstance(err, DatasetError) or not isinstance(err, Exception) else \
            rio.storage_problem(err)
        if problem is not None:  # the storage failed (S3 down, silent, refusing; a disk error)
            raise DatasetError(f"writing {dest} failed: {problem}; {left}") from err
        if not left.startswith("no shard"):
            log.warning("%s", left)
        raise
