"""Where images are listed from, for ``raysemi ingest`` and ``raysemi predict`` alike: a local folder or an
object-store prefix walked one folder at a time in sorted order (hidden files and ``_``/``.`` folders
skipped), and the one rule for symbolic links (within ``source_trees``, a link that leaves the source is
yielded, not entered, for the caller to quarantine with ``OUTSIDE_LINK``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from raysemi.core import io as rio

# The source trees a symbolic link may point into (ingest sets them unless --follow-symlinks); None: any.
_TREES: ContextVar[tuple[Path, ...] | None] = ContextVar("raysemi_source_trees", default=None)
OUTSIDE_LINK = "symbolic link out of the source folder (not read; --follow-symlinks reads it)"


@contextmanager
def source_trees(roots: list[Path] | None) -> Iterator[None]:
    """Within the block, files and folders reached through a symbolic link that leaves ``roots`` (real
    paths) are not read nor entered: ``escapes`` says so, and ingest quarantines them with ``OUTSIDE_LINK``.
    ``None``: links are followed anywhere."""
    token = _TREES.set(tuple(Path(os.path.realpath(r)) for r in roots) if roots is not None else None)
    try:
        yield
    finally:
        _TREES.reset(token)


def current_trees() -> tuple[Path, ...] | None:
    """The source trees set by ``source_trees`` (for a task that checks links in another process)."""
    return _TREES.get()


def escapes(path: Path, trees: tuple[Path, ...] | None = None) -> bool:
    """Whether ``path``, inside the source trees (``source_trees``, or ``trees``) as written, leads out of them
    through a symbolic link. (A path written outside them, e.g. ``../x.png`` in a CSV, is the user's own choice.)"""
    trees = trees if trees is not None else _TREES.get()
    if trees is None:
        return False
    roots = [str(t) for t in trees]

    def inside(p: str) -> bool:
        return any(p == t or p.startswith(t.rstrip(os.sep) + os.sep) for t in roots)

    return inside(os.path.abspath(path)) and not inside(os.path.realpath(path))


def visible(name: str) -> bool:
    return not name.startswith((".", "_"))


Root = Path | str  # a local folder, or a folder on an object store as a URI ("s3://bucket/prefix")


def is_remote_root(root: Root) -> bool:
    return isinstance(root, str) and rio.is_remote(root)


def name_of(p: Root) -> str:
    return p.name if isinstance(p, Path) else p.rstrip("/").rsplit("/", 1)[-1]


def child(root: Root, name: str) -> Root:
    return root / name if isinstance(root, Path) else rio.join(root, name)


def is_dir(p: Root) -> bool:
    if isinstance(p, Path):
        return p.is_dir()
    fs, path = rio.filesystem(p)
    return fs.isdir(path)


def subdirs(root: Root) -> list[Root]:
    if isinstance(root, Path):
        return sorted(p for p in root.iterdir() if p.is_dir() and visible(p.name))
    fs, path = rio.filesystem(root)
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True) if e["type"] == "directory"]
    return [rio.join(root, n) for n in sorted(names) if visible(n)]


def walk_files(root: Root) -> Iterator[Root]:
    """Every visible file under ``root``, in sorted order, one folder at a time (nothing is listed whole).
    Locally, through symbolic links to folders too (each real folder once); under ``source_trees``, a link
    that leaves them is yielded itself, not entered, for the caller to quarantine."""
    if is_remote_root(root):
        fs, path = rio.filesystem(root)
        scheme = root.split("://", 1)[0]
        for dirpath, dirnames, filenames in fs.walk(path, detail=False):
            dirnames[:] = sorted(d for d in dirnames if visible(d))  # walked top-down: prunes and orders
            fs.invalidate_cache(dirpath)  # one level's listing at a time: the cache would hold every key
            for f in sorted(filenames):
                if not f.startswith("."):
                    yield f"{scheme}://{dirpath.rstrip('/')}/{f}"
        return
    if escapes(root):  # a class or unlabeled folder that is itself such a link
        yield root
        return
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if visible(d)):
            full = Path(dirpath) / d
            if escapes(full):
                yield full
            elif os.path.realpath(full) not in seen:  # a link back up the tree: entered once
                seen.add(os.path.realpath(full))
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def list_files(root: Path) -> list[Path]:
    """``walk_files`` as a list (for sources that are read whole: DICOM headers, ``predict``'s listing)."""
    return list(walk_files(root))


def relative_path(f: Root, root: Root) -> str:
    """The path of ``f`` (from ``walk_files(root)``) relative to ``root``, with ``/``."""
    if isinstance(f, Path):
        return f.relative_to(root).as_posix()
    return f[len(str(root).rstrip("/")) + 1:]
