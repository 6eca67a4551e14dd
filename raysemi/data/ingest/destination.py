"""The ingest destination: refuse an existing dataset unless told, prove it writable, clean up after a failure."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from raysemi.core import io as rio
from raysemi.core.outputs import DATASET, MARKER, check_marked, guard_output
from raysemi.data import shards
from raysemi.data.shards import SPLITS, DatasetError

log = logging.getLogger("raysemi")

PART = re.compile(r"part-\d+\.parquet(\.tmp-[0-9a-f]+)?$")
STAGING = "_staging-"  # an ingest's working folder in the destination (``ingest.py``), removed when it ends
STAGED = re.compile(rf"{STAGING}[0-9a-f]{{8}}$")  # only such a name: never a folder of the user's


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(dest: str, overwrite: bool, sources: list[Path]) -> bool:
    """Refuse an existing dataset (unless overwrite) and prove the destination writable, writing nothing
    that stays."""
    fs, root = rio.filesystem(dest)
    if not rio.is_remote(dest):
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
    guard_output(dest, "a dataset (manifest.json)", exists, overwrite=overwrite, error=DatasetError)
    if exists:  # --overwrite: refused now, before any work, when raysemi cannot tell the dataset is its own
        check_marked(dest, DATASET, "a dataset (manifest.json)", DatasetError)
    probe = f"{root.rstrip('/')}/.raysemi-write-probe-{uuid.uuid4().hex[:8]}"
    created = False
    try:
        if isinstance(fs, LocalFileSystem) and not fs.exists(root):
            fs.makedirs(root, exist_ok=True)
            created = True
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except FileNotFoundError as err:
        where = f"bucket {root.split('/')[0]!r} does not exist" if rio.is_remote(dest) else str(err)
        raise DatasetError(f"cannot write to {dest}: {where}") from None
    except PermissionError as err:
        raise DatasetError(f"cannot write to {dest}: access denied ({err})") from None
    except Exception as err:
        raise DatasetError(f"cannot write to {dest}: {type(err).__name__}: {err}") from None
    return created


def remove_if_empty(dest: str, created: bool) -> None:
    """Undo the folder the destination probe created, when a failed ingest left nothing in it but its marker."""
    path = Path(rio.filesystem(dest)[1])
    if created and path.is_dir() and {p.name for p in path.iterdir()} <= {MARKER}:
        (path / MARKER).unlink(missing_ok=True)
        path.rmdir()


def clear_parts(dest: str, keep: str | None = None) -> None:
    """Remove shard files (and temporaries) under the split folders, and staging folders: leftovers of an
    unfinished ingest (but ``keep``, the running ingest's own staging folder)."""
    fs, root = rio.filesystem(dest)
    fs.invalidate_cache()
    try:
        staged = [n for n in fs.ls(root, detail=False) if STAGED.match(n.rstrip("/").rsplit("/", 1)[-1])
                  and (keep is None or n.rstrip("/") != rio.filesystem(keep)[1].rstrip("/"))]
    except (FileNotFoundError, NotADirectoryError):
        staged = []
    for name in staged:
        fs.rm(name, recursive=True)
    for split in SPLITS:
        sdir = f"{root.rstrip('/')}/{split}"
        try:
            names = fs.ls(sdir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        doomed = [n for n in names if PART.match(n.rsplit("/", 1)[-1])]
        if doomed:
            fs.rm(doomed)
        if isinstance(fs, LocalFileSystem) and fs.exists(sdir) and not fs.ls(sdir):
            fs.rmdir(sdir)


def remove_staging(staging: str) -> None:
    """Remove the staging folder; when the storage is what failed, the next ingest there removes it."""
    fs, path = rio.filesystem(staging)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as err:  # the original error is the one to report
        log.warning("could not remove the staging folder %s (%s)", staging, type(err).__name__)


def undo_partial(dest: str) -> str:
    """Remove the shards of a failed ingest; says what is left behind."""
    try:
        clear_parts(dest)
    except Exception as err:  # the storage may be what failed: the original error is the one to report
        return (f"partial shards may be left under {dest}/<split>/ (removing them failed too: {type(err).__name__}); "
                "without a manifest.json no command takes them for a dataset, and the next ingest to this "
                "destination removes them")
    return "no shard was left behind"
