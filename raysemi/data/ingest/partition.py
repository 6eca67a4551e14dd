"""Ingest's decisions over the index of every input: dedup, group-stratified carving of val/test, the shards.

Nothing here reads images or writes files: each step takes an Arrow table with one row per input (the small
columns ``ingest/chunks.py`` stages: ``source``, ``sort_key``, ``label``, ``group``, ``group_sort``,
``split``, ``sha``, ``nbytes``, ``reason``) and decides, vectorised (pyarrow, numpy), so that it runs in one
task at a million rows in seconds. The rules are the ones ingest always had (the per-item implementation is
kept in ``tests/data/ingest/test_partition.py`` as the reference the tests compare with):

* **dedup**: failures are quarantined; of each sha256 the first copy is kept (labelled rows first, then by
  row order); a copy with no label or the same label is a duplicate, one with another label is quarantined.
* **carve**: whole groups of the labelled train pool move to val/test, per majority class of the group, in a
  seeded shuffle of the groups, each taken while it brings its split closer to the target.
* **plan**: each split's rows, sorted by row order, are permuted (seeded) and cut into shards of about
  ``shard_mb`` MB, at least ``min_shards`` of them (fewer only when there are fewer rows).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "val", "test", "unlabeled")


def row_order(index: pa.Table) -> pa.ChunkedArray:
    """Row order: the source path, or (DICOM, where ``source`` is a salted hash) a salt-free key."""
    return pc.coalesce(index.column("sort_key"), index.column("source"))


@dataclass(frozen=True)
class Deduped:
    kept: pa.Table  # the rows kept, labelled first, then in row order
    quarantine: pa.Table  # source, reason: the failures in input order, then the conflicting copies
    duplicates: int  # exact copies dropped (same sha256, same or no label)


def dedup(index: pa.Table) -> Deduped:
    """Quarantine failures; keep the first of each sha256 (labelled first, then by row order)."""
    failed = pc.is_valid(index.column("reason"))
    quarantine = [index.filter(failed).select(["source", "reason"])]
    ok = index.filter(pc.invert(failed))
    keys = pa.table({"unlabeled": pc.is_null(ok.column("label")), "order": row_order(ok)})
    ok = ok.take(pc.sort_indices(keys, sort_keys=[("unlabeled", "ascending"), ("order", "ascending")]))
    sha = np.asarray(ok.column("sha").to_numpy(zero_copy_only=False), dtype=object)
    if len(sha) == 0:
        return Deduped(ok, pa.concat_tables(quarantine), 0)
    _, first, inverse = np.unique(sha, return_index=True, return_inverse=True)  # first: stable (mergesort)
    first_of = first[inverse.ravel()]
    copy = first_of != np.arange(len(sha))
    labels = np.asarray(ok.column("label").to_numpy(zero_copy_only=False), dtype=object)
    conflict = copy & np.array([x is not None for x in labels]) & (labels != labels[first_of])
    if conflict.any():
        sources = ok.column("source").to_numpy(zero_copy_only=False)
        at = np.flatnonzero(conflict)
        quarantine.append(pa.table({
            "source": pa.array(sources[at], pa.string()),
            "reason": pa.array([f"duplicate with conflicting label (of {sources[first_of[i]]})" for i in at],
                               pa.string()),
        }))
    return Deduped(ok.filter(pa.array(~copy)), pa.concat_tables(quarantine), int(copy.sum() - conflict.sum()))


def carve_group_splits(kept: pa.Table, carve: dict[str, float], seed: int) -> pa.Table:
    """``kept`` with its ``split`` column decided: the labelled rows without a split (or in ``train``) form
    the train pool, from which whole groups move to val/test, stratified by each group's majority class."""
    split = kept.column("split")
    pool = pc.and_(pc.is_valid(kept.column("label")),
                   pc.or_kleene(pc.is_null(split), pc.equal(split, "train")))
    split = pc.if_else(pool, "train", split)
    at = np.flatnonzero(pool.to_numpy(zero_copy_only=False))
    if len(at) and carve:
        members = kept.take(pa.array(at))
        # A row without a group is a group of its own, keyed apart from every named group.
        gkey = pc.coalesce(members.column("group"), pc.binary_join_element_wise("\0", members.column("source"), ""))
        rows = pa.table({"g": gkey, "label": members.column("label"), "i": pa.array(np.arange(len(at)))})
        per_label = rows.group_by(["g", "label"], use_threads=False).aggregate([("i", "min"), ("i", "count")])
        # The majority class of a group; a tie goes to the class met first among its rows.
        per_label = per_label.sort_by([("g", "ascending"), ("i_count", "descending"), ("i_min", "ascending")])
        groups = _groups(per_label, members.column("group_sort"), gkey)
        chosen = _carve_groups(groups, carve, seed)
        for name, keys in chosen.items():
            if keys:
                moved = np.zeros(kept.num_rows, bool)
                moved[at] = pc.is_in(gkey, value_set=pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
                split = pc.if_else(pa.array(moved), name, split)
    return kept.set_column(kept.schema.get_field_index("split"), "split", split)


def _groups(per_label: pa.Table, group_sort: pa.ChunkedArray, gkey: pa.ChunkedArray) -> list[tuple]:
    """(first row, key, sort key, majority class, size) of each group, in the order the groups first appear."""
    g = per_label.column("g").to_pylist()
    labels = per_label.column("label").to_pylist()
    first = per_label.column("i_min").to_numpy()
    count = per_label.column("i_count").to_numpy()
    sort_of = group_sort.to_pylist()
    out, start = [], 0
    for end in range(1, len(g) + 1):
        if end == len(g) or g[end] != g[start]:
            lo = int(first[start:end].min())
            out.append((lo, g[start], sort_of[lo] or g[start], labels[start], int(count[start:end].sum())))
            start = end
    out.sort()
    return out


def _carve_groups(groups: list[tuple], carve: dict[str, float], seed: int) -> dict[str, list[str]]:
    """The group keys each carved split takes: per class in a seeded shuffle, each group while it brings
    its split closer to the target (``round(class rows x fraction)``)."""
    by_class: dict[str, list[tuple]] = {}
    for _, key, order, majority, size in groups:
        by_class.setdefault(majority, []).append((order, key, size))
    rng = random.Random(seed)
    chosen: dict[str, list[str]] = {s: [] for s in carve}
    for cls in sorted(by_class):
        members = sorted(by_class[cls], key=lambda m: m[0])
        keys = [(key, size) for _, key, size in members]
        rng.shuffle(keys)
        n = sum(size for _, size in keys)
        targets = {s: round(n * f) for s, f in carve.items()}
        counts = dict.fromkeys(carve, 0)
        for key, size in keys:
            for s, t in targets.items():
                if counts[s] < t and abs(counts[s] + size - t) <= t - counts[s]:
                    counts[s] += size
                    chosen[s].append(key)
                    break
    return chosen


def groups_across_splits(kept: pa.Table) -> int:
    """Groups with rows in more than one split (only possible with splits the source gives)."""
    named = kept.filter(pc.and_(pc.is_valid(kept.column("group")), pc.not_equal(kept.column("split"), "unlabeled")))
    if named.num_rows == 0:
        return 0
    per = named.group_by("group", use_threads=False).aggregate([("split", "count_distinct")])
    return int(pc.sum(pc.greater(per.column("split_count_distinct"), 1)).as_py() or 0)


@dataclass(frozen=True)
class ShardPlan:
    """Where each kept row goes: ``split``, ``shard`` (number within the split) and ``pos`` (row within it)."""

    shard: np.ndarray
    pos: np.ndarray
    sizes: dict[str, list[int]]  # rows per shard, per split


def shard_count(rows: int, total_bytes: int, shard_mb: float, min_shards: int) -> int:
    """Shards of about ``shard_mb`` MB, at least ``min_shards``, never an empty one."""
    return min(rows, max(1, math.ceil(total_bytes / (shard_mb * 1e6)), min(min_shards, rows)))


def plan_shards(kept: pa.Table, shard_mb: float, min_shards: int, seed: int) -> ShardPlan:
    """Per split: its rows sorted by row order, permuted (seeded), cut into ``shard_count`` equal shards."""
    shard = np.full(kept.num_rows, -1, np.int64)
    pos = np.full(kept.num_rows, -1, np.int64)
    sizes: dict[str, list[int]] = {}
    split = kept.column("split")
    order = row_order(kept)
    nbytes = kept.column("nbytes").to_numpy()
    for name in SPLITS:
        at = np.flatnonzero(pc.equal(split, name).to_numpy(zero_copy_only=False))
        if len(at) == 0:
            sizes[name] = []
            continue
        rows = at[pc.sort_indices(order.take(pa.array(at))).to_numpy()]  # stable: ties keep kept order
        rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        k = shard_count(len(rows), int(nbytes[rows].sum()), shard_mb, min_shards)
        bounds = np.linspace(0, len(rows), k + 1).round().astype(int)
        j = np.arange(len(rows))
        s = np.searchsorted(bounds, j, side="right") - 1
        shard[rows], pos[rows] = s, j - bounds[s]
        sizes[name] = np.diff(bounds).tolist()
    return ShardPlan(shard, pos, sizes)
