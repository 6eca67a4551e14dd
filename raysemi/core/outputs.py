"""Output folders: the one check before writing where an earlier output may be, and what ``--overwrite`` removes.

raysemi removes only what it wrote. Every kind of output folder (a run, a dataset, the demo, ``predict``'s
folder, a tune experiment) has a ``Layout``: the names of the entries it writes at the top of the folder. A
command marks its folder before writing into it (``MARKER``, a small JSON file naming the kind);
``--overwrite`` then removes, in a folder marked with that kind, only the entries of the layout (a folder entry
with a layout of its own is cleared by that layout and removed only once empty), never the folder itself, and
nothing else there. A folder that holds an earlier output but not the marker of its kind (files of the user's
that look like ours, or an output of a raysemi older than the marker) is refused with one line: nothing is
removed that raysemi cannot tell it wrote. So a root, home or working directory given as an output folder
loses at most raysemi's own files.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from raysemi.core.errors import RaysemiError
from raysemi.core.io import exists, filesystem, join, storage_errors, write_bytes_atomic

MARKER = ".raysemi-output"


@dataclass(frozen=True)
class Layout:
    """What one kind of output writes at the top of its folder: ``entries`` are ``fnmatch`` patterns of names;
    ``children`` maps a pattern to the layout of the folders it names (cleared entry by entry, not removed
    whole). Only the top folder's marker is checked: a folder inside a marked one is raysemi's by its name."""

    kind: str
    entries: tuple[str, ...]
    children: Mapping[str, Layout] = field(default_factory=dict)

    def owns(self, name: str) -> bool:
        return name == MARKER or any(fnmatch.fnmatchcase(name, p) for p in self.entries)

    def child(self, name: str) -> Layout | None:
        return next((lay for p, lay in self.children.items() if fnmatch.fnmatchcase(name, p)), None)


def marked_kind(where: str) -> str | None:
    """The kind named by the marker in ``where``; None without one."""
    fs, path = filesystem(join(where, MARKER))
    try:
        with fs.open(path, "rb") as fh:
            return str(json.loads(fh.read()).get("kind"))
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):
        return "unreadable"


def mark(where: str, layout: Layout) -> None:
    """Claim ``where`` for an output of ``layout.kind`` before writing into it (idempotent); a folder another
    kind of output claimed is refused."""
    kind = marked_kind(where)
    if kind == layout.kind:
        return
    if kind is not None:
        raise RaysemiError(f"{where} holds another kind of raysemi output ({kind}, per its {MARKER}): choose "
                           f"another folder for this {layout.kind}")
    write_bytes_atomic(join(where, MARKER), json.dumps({"kind": layout.kind, "written_by": "raysemi"}).encode())


def _names(fs, path: str) -> list[str]:
    fs.invalidate_cache(path)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def clear(where: str, layout: Layout) -> list[str]:
    """Remove the entries of ``layout`` from ``where`` (no marker check: ``remove_output`` does it); returns
    the names of what stayed (not raysemi's)."""
    fs, path = filesystem(where)
    base = path.rstrip("/")
    kept = []
    for name in _names(fs, path):
        if name == MARKER or not layout.owns(name):
            if name != MARKER:
                kept.append(name)
            continue
        full = f"{base}/{name}"
        sub = layout.child(name)
        if sub is not None and fs.isdir(full):
            left = clear(join(where, name), sub)
            if not left and isinstance(fs, LocalFileSystem):
                marker = f"{full}/{MARKER}"
                if fs.exists(marker):
                    fs.rm(marker)
                fs.rmdir(full)
            kept += [f"{name}/{n}" for n in left]
        else:
            fs.rm(full, recursive=True)
    return kept


def check_marked(where: str, layout: Layout, what: str, error: type[RaysemiError] = RaysemiError) -> None:
    """Refuse (one line) to replace ``what`` in ``where`` unless the folder carries the marker of its kind."""
    kind = marked_kind(where)
    if kind != layout.kind:
        whose = "no raysemi marker" if kind is None else f"a marker of another kind ({kind})"
        raise error(f"{where} holds {what} but {whose} ({MARKER}): raysemi removes only what it can tell it "
                    "wrote; remove it yourself or choose another folder")


def remove_output(where: str, layout: Layout, what: str, error: type[RaysemiError] = RaysemiError) -> list[str]:
    """``--overwrite``: remove what an earlier output of ``layout.kind`` wrote in ``where``, and only that; a
    folder without the marker of that kind is refused (one line). Returns the names left in place."""
    check_marked(where, layout, what, error)
    return clear(where, layout)


def guard_output(where: str, what: str, found: str | bool, *, resume: bool | None = None, overwrite: bool = False,
                 layout: Layout | None = None, remove: str | None = None,
                 error: type[RaysemiError] = RaysemiError) -> bool:
    """The one check before writing where an earlier output may be: ``found`` (a URI that exists when it is
    there, or the answer itself) says whether ``where`` already holds ``what``. Refused unless ``overwrite`` or
    ``resume`` (None: this command cannot resume, so only --overwrite is offered). ``overwrite`` removes what
    the earlier output wrote: the entries of ``layout`` (``remove_output``) or the one file or folder ``remove``
    (a name raysemi gives, such as a weights file). Returns True when the earlier output is to be continued."""
    if isinstance(found, bool):
        earlier = found
    else:
        with storage_errors(f"cannot check {where}", error):  # often the output's first access: S3 refusing
            earlier = exists(found)
    if not earlier:
        return False
    if overwrite:
        if layout is not None:
            remove_output(where, layout, what, error)
        if remove is not None and exists(remove):
            fs, path = filesystem(remove)
            fs.rm(path, recursive=True)
        return False
    if resume:
        return True
    hint = "pass --overwrite to replace it" if resume is None else \
        "pass --resume to continue it or --overwrite to replace it"
    raise error(f"{where} already holds {what}: {hint}")


# ---------------------------------------------------------------- what each kind of output writes

_TMP = "*.tmp-*"  # io.write_bytes_atomic's temporaries, left by a writer that was killed

SPLIT_SHARDS = Layout("dataset split", ("part-*.parquet", "part-*.parquet.tmp-*"))
DATASET = Layout(
    "dataset",
    ("manifest.json", "quarantine.parquet", "train", "val", "test", "unlabeled", ".raysemi-write-probe-*", _TMP),
    children={s: SPLIT_SHARDS for s in ("train", "val", "test", "unlabeled")},
)
RUN = Layout(
    "run",
    ("config.yaml", "report.json", "report.md", "confusion_matrix.png", "accuracy_per_round.png",
     "reliability.png", "events.out.tfevents.*", "ray", "pretrain", "finetune", "round=*", "predictions",
     "evaluate-*", _TMP),
)
TRAINSET = Layout("training set", ("part-*.parquet", "_trainset.json", _TMP))  # inside a run's folders
SYNTHETIC_IMAGES = Layout(
    "synthetic images", ("README.txt", "unlabeled_truth.csv", "synthetic_*", "unlabeled"),
    children={"synthetic_*": Layout("synthetic class", ("p*_*.png",)),
              "unlabeled": Layout("synthetic pool", ("p*_*.png",))},
)
DEMO = Layout(
    "demo", ("data", "run"),
    children={
        "data": Layout("demo data", ("images", "dataset"), children={
            "images": Layout("demo images", ("SYNTHETIC-demo",),
                             children={"SYNTHETIC-demo": SYNTHETIC_IMAGES}),
            "dataset": DATASET,
        }),
        "run": RUN,
    },
)
PREDICT = Layout(
    "predictions",
    ("run.json", "summary.json", "predictions.parquet", "predictions.csv", "failed.csv", "inputs", "results", "predictions",
     _TMP),
)
TUNE = Layout(
    "tune experiment",
    ("raysemi_tune.json", "tune_results.csv", "tune_results.md", "heatmap.png", "best_config.yaml", "best_run",
     "trials", "run_trial_*", "experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
     "searcher-state-*.pkl", "callback-states-*.pkl", "tuner.pkl", "trainable.pkl", ".validate_storage_marker",
     _TMP),
)
# A Ray Train run's folder (``<storage>/<run name>``): its checkpoints and Train's own records.
TRAIN_RUN = Layout("Ray Train run", ("checkpoint_*", "checkpoint_manager_snapshot.json", ".validate_storage_marker",
                                     _TMP))
