"""Ingest's decisions (``data/partition.py``) against the per-item implementation ingest had until revision
58ff6dc, kept here as the reference: the same kept rows, quarantine, splits and shards on random inputs with
every case (copies with the same or another label, failures, groups with tied majorities, provided splits)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from raysemi.data.ingest import partition

# ---------------------------------------------------------------- the reference (revision 58ff6dc)


@dataclass
class Row:
    source: str
    label: str | None
    group: str | None
    split: str | None
    sha: str = ""
    nbytes: int = 0
    reason: str | None = None
    sort_key: str = ""
    group_sort: str | None = None


def ref_order(it: Row) -> str:
    return it.sort_key or it.source


def ref_dedup(items: list[Row]) -> tuple[list[Row], list[dict[str, str]], int]:
    quarantine = [{"source": it.source, "reason": it.reason} for it in items if it.reason is not None]
    kept, first, duplicates = [], {}, 0
    for it in sorted((it for it in items if it.reason is None), key=lambda it: (it.label is None, ref_order(it))):
        prev = first.setdefault(it.sha, it)
        if prev is it:
            kept.append(it)
        elif it.label is None or it.label == prev.label:
            duplicates += 1
        else:
            quarantine.append({"source": it.source, "reason": f"duplicate with conflicting label (of {prev.source})"})
    return kept, quarantine, duplicates


def ref_carve(items: list[Row], carve: dict[str, float], seed: int) -> None:
    pool = [it for it in items if it.label is not None and it.split in (None, "train")]
    for it in pool:
        it.split = "train"
    groups: dict[str, list[Row]] = defaultdict(list)
    for it in pool:
        groups[it.group if it.group is not None else f"\0{it.source}"].append(it)
    order = {k: (m[0].group_sort or k) for k, m in groups.items()}
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_class[Counter(m.label for m in members).most_common(1)[0][0]].append(key)
    rng = random.Random(seed)
    for cls in sorted(by_class):
        keys = sorted(by_class[cls], key=order.__getitem__)
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


def ref_plan(items: list[Row], shard_mb: float, min_shards: int, seed: int) -> list[list[Row]]:
    if not items:
        return []
    rows = sorted(items, key=ref_order)
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    total = sum(it.nbytes for it in rows)
    k = min(len(rows), max(1, math.ceil(total / (shard_mb * 1e6)), min(min_shards, len(rows))))
    bounds = np.linspace(0, len(rows), k + 1).round().astype(int)
    return [rows[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------- random inputs


def random_rows(seed: int, n: int = 400) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["a", "b", "c", None, "a"])
        split = rng.choice([None] * 6 + ["train", "val", "test"]) if label is not None else "unlabeled"
        group = rng.choice([None, f"g{rng.randrange(60):02d}"])
        sha = f"s{rng.randrange(int(n * 0.8)):04d}"  # about a fifth are copies of another row
        reason = rng.choice([None] * 12 + ["not an image", "over pixel limit (9 x 9)"])
        salted = rng.random() < 0.2  # DICOM-like rows: a salt-free key orders them
        rows.append(Row(f"f/{rng.randrange(10**6):06d}_{i}.png", label, group, split, sha, rng.randrange(100, 5000),
                        reason, sort_key=f"k{i:04d}" if salted else "",
                        group_sort=f"o{group}" if salted and group else None))
    return rows


def as_index(rows: list[Row]) -> pa.Table:
    def col(name):
        vals = [getattr(r, name) for r in rows]
        return [v or None for v in vals] if name in ("sort_key", "group_sort") else vals
    return pa.table({
        **{n: pa.array(col(n), pa.string()) for n in ("source", "sort_key", "label", "group", "group_sort", "split",
                                                        "sha", "reason")},
        "nbytes": pa.array(col("nbytes"), pa.int64()),
    })


@pytest.mark.parametrize("seed", range(6))
def test_dedup_carve_and_plan_equal_the_reference(seed):
    rows = random_rows(seed)
    index = as_index(rows)  # before the reference carves (it moves the rows' splits in place)
    carve = {"val": 0.15, "test": 0.1} if seed % 2 else {"val": 0.2}
    kept, quarantine, duplicates = ref_dedup(rows)
    ref_carve(kept, carve, seed)
    plans = {s: ref_plan([it for it in kept if it.split == s], 0.05, 3, seed) for s in partition.SPLITS}

    got = partition.dedup(index)
    assert got.quarantine.to_pylist() == quarantine
    assert got.duplicates == duplicates
    assert got.kept.column("source").to_pylist() == [it.source for it in kept]
    carved = partition.carve_group_splits(got.kept, carve, seed)
    assert carved.column("split").to_pylist() == [it.split for it in kept]
    assert {it.split for it in kept} >= {"val", "train"}  # the case is exercised
    where = partition.plan_shards(carved, 0.05, 3, seed)
    sources = carved.column("source").to_pylist()
    for s, plan in plans.items():
        assert where.sizes[s] == [len(p) for p in plan]
        at = [i for i, x in enumerate(carved.column("split").to_pylist()) if x == s]
        got_shards = [sorted((where.pos[i], sources[i]) for i in at if where.shard[i] == k) for k in range(len(plan))]
        assert [[src for _, src in shard] for shard in got_shards] == [[it.source for it in p] for p in plan]


def test_carve_keeps_groups_whole_and_stratifies():
    rows = [Row(f"p{g}/{i}.png", "a" if g % 4 else "b", f"p{g}", None, f"{g:04d}{i}", 1000)
            for g in range(40) for i in range(3)]
    carved = partition.carve_group_splits(partition.dedup(as_index(rows)).kept, {"val": 0.2, "test": 0.1}, 0)
    by_group: dict[str, set] = defaultdict(set)
    for g, s in zip(carved.column("group").to_pylist(), carved.column("split").to_pylist()):
        by_group[g].add(s)
    assert all(len(s) == 1 for s in by_group.values()), "a patient spans two splits"
    counts = Counter(zip(carved.column("split").to_pylist(), carved.column("label").to_pylist()))
    # 90 rows of class a (30 patients), 30 of b (10 patients): each split gets about its fraction of each class
    assert counts[("val", "a")] == 18 and counts[("val", "b")] == 6
    assert counts[("test", "a")] == 9 and counts[("test", "b")] == 3


def test_plan_never_makes_an_empty_shard():
    rows = [Row(f"{i}.png", "a", None, "train", f"{i}", 1000) for i in range(3)]
    kept = partition.dedup(as_index(rows)).kept
    assert partition.plan_shards(kept, shard_mb=64, min_shards=8, seed=0).sizes["train"] == [1, 1, 1]
    assert partition.plan_shards(kept.slice(0, 0), 64, 4, 0).sizes == {s: [] for s in partition.SPLITS}
    assert partition.shard_count(100, 100_000, 0.03, 2) == 4  # 100 kB / 30 kB, rounded up


def test_groups_across_splits_counts_only_named_groups():
    rows = [Row("a.png", "a", "g1", "train", "1"), Row("b.png", "a", "g1", "test", "2"),
            Row("c.png", "a", None, "train", "3"), Row("d.png", "a", None, "val", "4")]
    assert partition.groups_across_splits(partition.dedup(as_index(rows)).kept) == 1
