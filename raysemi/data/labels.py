"""Which train labels a run may use: "few labels" simulated on a fully labelled set, deterministically.

A row's rank within its class is the sha256 of ``"<seed>:<id>"``, so the same rows are chosen on every
run, on every machine, whatever the shard order; a larger fraction always includes a smaller one's rows.
Rows whose label is hidden this way join the unlabelled pool, and their true labels later measure the
pseudo-label precision.

The choice is a ``LabelRule``: per class, the largest rank key still chosen (or all of the class). It is
computed from the manifest's class counts and, for a partial choice, the k-th smallest key of each class
(``order_stats``) over the train shards, in Ray tasks: no per-row list reaches the driver. The pool is the
predicate "label null, or not chosen" (or any row of the ``unlabeled`` split).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysemi.core.config import DataConfig
from raysemi.data.order_stats import RangeSummary, at_or_below, kth_smallest, summarize
from raysemi.data.shards import DatasetError, Manifest, Mapper, local_map, read_shard, shard_groups

RANK = ("rank",)


def rank_keys(seed: int, ids: Sequence[str]) -> pa.Array:
    """The rank key of each id: the hex sha256 of ``"<seed>:<id>"``."""
    return pa.array([hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids], pa.string())


@dataclass(frozen=True)
class LabelRule:
    """Per class: the largest rank key chosen, ``"all"`` (the whole class) or None (none)."""

    seed: int
    limits: tuple[str | None, ...]

    @property
    def everything(self) -> bool:
        return all(limit == "all" for limit in self.limits)

    def chosen(self, table: pa.Table) -> np.ndarray:
        """Mask over ``table`` (``id``, ``label``): the labelled rows this rule keeps."""
        labels = table.column("label")
        has = np.asarray(pc.is_valid(labels).to_numpy(zero_copy_only=False), dtype=bool)
        if self.everything or not has.any():
            return has
        y = np.asarray(labels.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        mask = np.zeros(table.num_rows, dtype=bool)
        rows = np.flatnonzero(has)
        keys = pa.table({"rank": rank_keys(self.seed, table.column("id").take(pa.array(rows)).to_pylist())})
        for c, limit in enumerate(self.limits):
            of_c = y[rows] == c
            if of_c.any():
                bound = limit if limit in ("all", None) else (limit,)
                mask[rows[of_c]] = at_or_below(keys.filter(pa.array(of_c)), RANK, bound)
        return mask

    def pool(self, table: pa.Table, split: str) -> np.ndarray:
        """Mask over ``table``: the rows of the unlabelled pool (any row of ``unlabeled``)."""
        if split == "unlabeled":
            return np.ones(table.num_rows, dtype=bool)
        return ~self.chosen(table)


@dataclass(frozen=True)
class LabelSplit:
    """The train split seen through ``DataConfig``: a rule and counts (no ids)."""

    rule: LabelRule
    labeled_counts: list[int]  # chosen labelled rows per class
    hidden_counts: list[int]  # labelled train rows whose label is hidden (in the pool) per class
    pool_rows: int  # null-label rows of train/unlabeled + hidden-label rows

    @property
    def n_labeled(self) -> int:
        return sum(self.labeled_counts)


def quota(count: int, fraction: float | None, per_class: int | None) -> int:
    """How many labels of a class of ``count`` a run keeps: all, a fraction (at least one), or N."""
    if fraction is None and per_class is None:
        return count
    n = per_class if per_class is not None else max(1, math.ceil(fraction * count))
    return min(n, count)


def class_ranges(uris: list[str], seed: int, ranges: dict[int, tuple]) -> dict[int, RangeSummary]:
    """One task: the rank-key summaries of each class's labelled rows in a group of train shards."""
    table = pa.concat_tables([read_shard(u, ["id", "label"]) for u in uris])
    table = table.filter(pc.is_valid(table.column("label")))
    keyed = pa.table({"rank": rank_keys(seed, table.column("id").to_pylist()), "label": table.column("label")})
    out = {}
    for c, (lo, hi) in ranges.items():
        rows = keyed.filter(pc.equal(keyed.column("label"), pa.scalar(c, pa.int16())))
        out[c] = summarize(rows, RANK, lo, hi)
    return out


def _train_counts(root: str, manifest: Manifest, data: DataConfig) -> tuple[list[int], list[int]]:
    """Labelled train rows per class (the manifest's) and how many of each the run keeps."""
    train = manifest.splits.get("train")
    if train is None or train.labeled == 0:
        raise DatasetError(f"dataset {root} has no labelled rows in its train split")
    counts = [int(train.label_counts.get(name, 0)) for name in manifest.classes]
    if sum(counts) != train.labeled:
        raise DatasetError(f"{root}: the manifest's class counts ({sum(counts)}) do not add up to its "
                           f"{train.labeled} labelled train rows")
    return counts, [quota(n, data.label_fraction, data.labels_per_class) for n in counts]


def pool_rows(root: str, manifest: Manifest, data: DataConfig) -> int:
    """Rows of the unlabelled pool under ``data``'s label budget, from the manifest alone."""
    keep = _train_counts(root, manifest, data)[1]
    rows = sum(manifest.splits[s].rows for s in ("train", "unlabeled") if s in manifest.splits)
    return rows - sum(keep)


def label_split(root: str, data: DataConfig, manifest: Manifest, map_fn: Mapper = local_map) -> LabelSplit:
    """Apply the label budget of ``data`` to the train split of the dataset at ``root``; the per-row work
    (rank keys of the train rows) runs through ``map_fn`` (Ray tasks: ``ray_tasks.task_mapper``)."""
    counts, keep = _train_counts(root, manifest, data)
    limits: list[str | None] = ["all" if k == n else None for k, n in zip(keep, counts)]
    partial = {c: k for c, (k, n) in enumerate(zip(keep, counts)) if 0 < k < n}
    if partial:
        train = manifest.splits["train"]
        groups = shard_groups(manifest.shard_uris(root, "train"), [s.rows for s in train.shards])

        def run_pass(ranges):
            return map_fn(class_ranges, [(g, data.label_seed, ranges) for g in groups])

        for c, key in kth_smallest(partial, run_pass).items():
            limits[c] = key[0]
    hidden = [n - k for n, k in zip(counts, keep)]
    return LabelSplit(LabelRule(data.label_seed, tuple(limits)), keep, hidden, pool_rows(root, manifest, data))
