"""Ingest's named pieces on their own: group-stratified carving, the shard plan, writing the shards."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from raysemi.data import shards
from raysemi.data.partition import carve_group_splits, dedup, plan_shards
from raysemi.data.shard_writer import write_shards
from raysemi.data.sources import Item
from raysemi.data.validate import Checked


def items(n_groups: int = 40, per_group: int = 3) -> list[Item]:
    """``n_groups`` patients of ``per_group`` images; class by patient (two classes, 3:1)."""
    return [
        Item(source=f"p{g}/{i}.png", label="a" if g % 4 else "b", group=f"p{g}", split=None,
             sha=f"{g:04d}{i}", nbytes=1000, check=Checked())
        for g in range(n_groups) for i in range(per_group)
    ]


def test_carve_keeps_groups_whole_and_stratifies():
    rows = items()
    carve_group_splits(rows, {"val": 0.2, "test": 0.1}, seed=0)
    by_group: dict[str, set] = {}
    for it in rows:
        by_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in by_group.values()), "a patient spans two splits"
    counts = Counter((it.split, it.label) for it in rows)
    # 90 rows of class a (30 patients), 30 of b (10 patients): each split gets about its fraction of each class
    assert counts[("val", "a")] == 18 and counts[("val", "b")] == 6
    assert counts[("test", "a")] == 9 and counts[("test", "b")] == 3
    again = items()
    carve_group_splits(again, {"val": 0.2, "test": 0.1}, seed=0)
    assert [it.split for it in again] == [it.split for it in rows]  # deterministic for a seed


def test_carve_leaves_unlabelled_and_provided_splits_alone():
    rows = items(10, 1)
    rows[0].label = None
    rows[1].split = "test"
    carve_group_splits(rows, {"val": 0.5}, seed=1)
    assert rows[0].split is None and rows[1].split == "test"


def test_plan_covers_every_item_once_in_enough_shards():
    rows = items(20, 5)  # 100 rows of 1 kB
    plan = plan_shards(rows, shard_mb=0.03, min_shards=2, seed=0)
    assert len(plan) == 4  # 100 kB / 30 kB, rounded up
    assert sorted(it.sha for p in plan for it in p) == sorted(it.sha for it in rows)
    assert max(map(len, plan)) - min(map(len, plan)) <= 1
    assert len(plan_shards(rows[:3], shard_mb=64, min_shards=8, seed=0)) == 3  # never an empty shard
    assert plan_shards([], shard_mb=64, min_shards=4, seed=0) == []
    assert [[it.sha for it in p] for p in plan_shards(rows, 0.03, 2, 0)] == [[it.sha for it in p] for p in plan]


def test_dedup_keeps_one_copy_and_quarantines_conflicts():
    a, b, c = items(3, 1)
    b.sha = a.sha  # same image, other label: conflict
    c.sha, c.label = a.sha, None  # same image, unlabelled: a plain duplicate
    kept, quarantine, duplicates = dedup([a, b, c])
    assert kept == [a] and duplicates == 1
    assert [q["source"] for q in quarantine] == [b.source]


def test_write_shards_writes_what_was_planned(tmp_path):
    rows = []
    for k in range(6):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), k * 40, np.uint8), "L").save(buf, "PNG")
        data = buf.getvalue()
        rows.append(Item(source=f"{k}.png", label="ab"[k % 2], group=None, split="train",
                         sha=shards.image_id(data), keep=data, nbytes=len(data), check=Checked()))
    plan = [("train", i, p) for i, p in enumerate(plan_shards(rows, 64, 2, 0))]
    written = write_shards(str(tmp_path), plan, {"a": 0, "b": 1}, progress=False)
    assert sorted(written) == [("train", 0), ("train", 1)]
    table = shards.read_shard(str(tmp_path / "train" / "part-00000.parquet"))
    assert table.num_rows == written[("train", 0)].rows == len(plan[0][2])
    assert table.column("id").to_pylist() == [it.sha for it in plan[0][2]]
    rows[0].keep, rows[0].path = None, tmp_path / "gone.png"
    with pytest.raises(OSError):
        write_shards(str(tmp_path / "again"), plan, {"a": 0, "b": 1}, progress=False)
