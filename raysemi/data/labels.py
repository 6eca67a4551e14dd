"""Which train labels a run may use: "few labels" simulated on a fully labelled set, deterministically.

A row's rank within its class is the sha256 of ``"<seed>:<id>"``, so the same rows are chosen on every
run, on every machine, whatever the shard order; a larger fraction always includes a smaller one's rows.
Rows whose label is hidden this way join the unlabelled pool, and their true labels later measure the
pseudo-label precision.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysemi.config import DataConfig
from raysemi.data.shards import DatasetError, read_split


@dataclass(frozen=True)
class LabelSplit:
    """The train split seen through ``DataConfig``: chosen labelled rows and the unlabelled pool."""

    labeled_ids: list[str]
    labeled_targets: np.ndarray  # int64, aligned with labeled_ids
    pool_ids: list[str]  # null-label rows of train/unlabeled + hidden-label rows
    pool_truth: dict[str, int]  # id -> true label, for hidden-label rows only


def _rank_key(seed: int, id_: str) -> str:
    return hashlib.sha256(f"{seed}:{id_}".encode()).hexdigest()


def choose_labeled(
    ids: list[str], labels: np.ndarray, fraction: float | None, per_class: int | None, seed: int
) -> np.ndarray:
    """Boolean mask over labelled rows: all, a fraction of each class (at least one), or N per class."""
    labels = np.asarray(labels)
    mask = np.zeros(len(ids), dtype=bool)
    if fraction is None and per_class is None:
        mask[:] = True
        return mask
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = sorted(idx, key=lambda i: _rank_key(seed, ids[i]))
        n = per_class if per_class is not None else max(1, math.ceil(fraction * len(idx)))
        mask[order[:n]] = True
    return mask


def label_split(root: str, data: DataConfig) -> LabelSplit:
    """Read the ids and labels of ``train`` (and ``unlabeled``) and apply the label budget of ``data``."""
    table = read_split(root, "train", columns=["id", "label"])
    try:
        unl = read_split(root, "unlabeled", columns=["id", "label"])
    except DatasetError:
        unl = pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.int16())})
    ids = table.column("id").to_pylist()
    raw = table.column("label").to_pylist()
    has = [i for i, v in enumerate(raw) if v is not None]
    if not has:
        raise DatasetError(f"dataset {root} has no labelled rows in its train split")
    l_ids = [ids[i] for i in has]
    l_lab = np.array([raw[i] for i in has], dtype=np.int64)
    mask = choose_labeled(l_ids, l_lab, data.label_fraction, data.labels_per_class, data.label_seed)
    pool = [ids[i] for i, v in enumerate(raw) if v is None] + unl.column("id").to_pylist()
    hidden = {l_ids[i]: int(l_lab[i]) for i in np.flatnonzero(~mask)}
    return LabelSplit(
        labeled_ids=[l_ids[i] for i in np.flatnonzero(mask)],
        labeled_targets=l_lab[mask],
        pool_ids=pool + list(hidden),
        pool_truth=hidden,
    )
