"""The few-label choice behind every reported figure: deterministic, nested, stratified, never empty, and the
same rows as the sorted-list implementation it replaced, on the demo set and on a set that needs several passes."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from raysemi.core.config import DataConfig
from raysemi.data import order_stats
from raysemi.data.labels import label_split, pool_rows
from raysemi.data.shards import (
    SCHEMA,
    Manifest,
    SplitInfo,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)

CLASSES = ["a", "b", "c"]


def write_set(root: str, labels: list[int | None], per_shard: int, seed: int = 0) -> None:
    """A train split of the given labels (None: unlabelled) in shards of ``per_shard`` rows, plus val/test."""
    rng = np.random.default_rng(seed)
    ids = [f"id{i:06d}" for i in rng.permutation(len(labels))]
    splits = {}
    for split, rows in (("train", list(zip(ids, labels))), ("val", [("v0", 0)]), ("test", [("t0", 1)])):
        info = SplitInfo(label_counts=dict.fromkeys(CLASSES, 0))
        for k, start in enumerate(range(0, len(rows), per_shard)):
            chunk = rows[start:start + per_shard]
            table = pa.table({"id": [i for i, _ in chunk], "image": [b"x"] * len(chunk),
                              "label": pa.array([y for _, y in chunk], pa.int16()),
                              "group": pa.array([None] * len(chunk), pa.string()),
                              "source": [i for i, _ in chunk]}, schema=SCHEMA)
            info.shards.append(write_shard(root, f"{split}/part-{k:05d}.parquet", table))
            info.rows += len(chunk)
            for _, y in chunk:
                if y is not None:
                    info.labeled += 1
                    info.label_counts[CLASSES[y]] += 1
        splits[split] = info
    write_manifest(root, Manifest(classes=CLASSES, splits=splits, synthetic=True))


def reference(ids: list[str], labels: list[int | None], fraction, per_class, seed) -> set[str]:
    """The choice as it was written before it moved to shards: a Python sort of each class by sha256 key."""
    out = set()
    for c in {y for y in labels if y is not None}:
        of_c = [i for i, y in zip(ids, labels) if y == c]
        if fraction is None and per_class is None:
            out |= set(of_c)
            continue
        order = sorted(of_c, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        out |= set(order[: per_class if per_class is not None else max(1, math.ceil(fraction * len(of_c)))])
    return out


def chosen(root: str, fraction=None, per_class=None, seed=0) -> set[str]:
    manifest = read_manifest(root)
    split = label_split(root, DataConfig(path=root, label_fraction=fraction, labels_per_class=per_class,
                                         label_seed=seed), manifest)
    out = set()
    for uri in manifest.shard_uris(root, "train"):
        table = read_shard(uri, ["id", "label"])
        out |= set(table.filter(pa.array(split.rule.chosen(table))).column("id").to_pylist())
    assert len(out) == split.n_labeled
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, list[str], list[int | None]]:
    root = str(tmp_path_factory.mktemp("labels") / "ds")
    labels = [0] * 200 + [1] * 90 + [2] * 10 + [None] * 30  # imbalanced, one small class, some unlabelled
    write_set(root, labels, per_shard=47)
    table = pa.concat_tables([read_shard(u, ["id", "label"]) for u in read_manifest(root).shard_uris(root, "train")])
    return root, table.column("id").to_pylist(), table.column("label").to_pylist()


def test_deterministic_nested_and_seeded(small):
    root = small[0]
    assert chosen(root, 0.1) == chosen(root, 0.1)
    assert chosen(root, 0.1, seed=1) != chosen(root, 0.1)  # the seed picks other rows
    assert chosen(root, 0.05) < chosen(root, 0.2) < chosen(root, 0.5)  # a larger fraction includes a smaller
    assert chosen(root, per_class=2) < chosen(root, per_class=5)


def test_stratified_per_class_with_at_least_one_each(small):
    root, ids, labels = small
    label_of = dict(zip(ids, labels))
    assert Counter(label_of[i] for i in chosen(root, 0.05)) == {0: 10, 1: 5, 2: 1}  # ceil(5%): the small class gets 1
    assert Counter(label_of[i] for i in chosen(root, per_class=3)) == {0: 3, 1: 3, 2: 3}
    assert chosen(root) == {i for i, y in label_of.items() if y is not None}  # no budget: every labelled row
    assert Counter(label_of[i] for i in chosen(root, per_class=50)) == {0: 50, 1: 50, 2: 10}  # all of a small class


@pytest.mark.parametrize("fraction,per_class,seed", [(0.1, None, 0), (0.37, None, 3), (None, 7, 1), (None, None, 0)])
def test_the_same_rows_as_the_sorted_list_implementation(small, fraction, per_class, seed):
    root, ids, labels = small
    assert chosen(root, fraction, per_class, seed) == reference(ids, labels, fraction, per_class, seed)


def test_the_same_rows_when_the_search_needs_several_passes(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    labels = [int(y) if rng.random() < 0.8 else None for y in rng.integers(0, 3, 6000)]
    root = str(tmp_path / "ds")
    write_set(root, labels, per_shard=700)
    monkeypatch.setattr(order_stats, "SAMPLES", 8)  # tiny summaries: several narrowing passes
    table = pa.concat_tables([read_shard(u, ["id", "label"]) for u in read_manifest(root).shard_uris(root, "train")])
    ids, labs = table.column("id").to_pylist(), table.column("label").to_pylist()
    assert chosen(root, 0.1, seed=2) == reference(ids, labs, 0.1, None, 2)


def test_the_pool_is_every_row_the_rule_does_not_keep(demo_dataset):
    manifest = read_manifest(demo_dataset)
    data = DataConfig(path=demo_dataset, label_fraction=0.2)
    split = label_split(demo_dataset, data, manifest)
    in_pool, kept, truth = 0, 0, {}
    for s in ("train", "unlabeled"):
        for uri in manifest.shard_uris(demo_dataset, s) if s in manifest.splits else []:
            table = read_shard(uri, ["id", "label"])
            pool, keep = split.rule.pool(table, s), split.rule.chosen(table)
            assert not (pool & keep).any() and (pool | keep).all()
            in_pool += int(pool.sum())
            kept += int(keep.sum())
            hidden = table.filter(pa.array(pool & np.asarray(table.column("label").is_valid())))
            truth.update(zip(hidden.column("id").to_pylist(), hidden.column("label").to_pylist()))
    assert in_pool == split.pool_rows == pool_rows(demo_dataset, manifest, data)
    assert kept == split.n_labeled and sum(split.hidden_counts) == len(truth)
    assert split.labeled_counts == [math.ceil(0.2 * n) for n in manifest.splits["train"].label_counts.values()]
