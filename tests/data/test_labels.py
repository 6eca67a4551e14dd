"""The few-label choice behind every reported figure: deterministic, nested, stratified, never empty."""

from __future__ import annotations

from collections import Counter

import numpy as np

from raysemi.config import DataConfig
from raysemi.data.labels import choose_labeled, label_split
from raysemi.data.shards import read_split

IDS = [f"id{i:03d}" for i in range(300)]
LABELS = np.array([0] * 200 + [1] * 90 + [2] * 10)  # imbalanced, one small class


def chosen(fraction=None, per_class=None, seed=0, ids=IDS, labels=LABELS) -> set[str]:
    mask = choose_labeled(ids, labels, fraction, per_class, seed)
    return {i for i, m in zip(ids, mask) if m}


def test_deterministic_whatever_the_row_order():
    order = np.random.default_rng(0).permutation(len(IDS))
    shuffled = chosen(0.1, ids=[IDS[i] for i in order], labels=LABELS[order])
    assert chosen(0.1) == chosen(0.1) == shuffled
    assert chosen(0.1, seed=1) != chosen(0.1)  # the seed picks other rows


def test_a_larger_fraction_includes_a_smaller_ones_rows():
    small, mid, large = chosen(0.05), chosen(0.2), chosen(0.5)
    assert small < mid < large
    assert chosen(per_class=2) < chosen(per_class=5)


def test_stratified_per_class_with_at_least_one_each():
    by_class = Counter(int(LABELS[IDS.index(i)]) for i in chosen(0.05))
    assert by_class == {0: 10, 1: 5, 2: 1}  # ceil(5% of 200, 90, 10): the 10-row class still gets one
    assert Counter(int(LABELS[IDS.index(i)]) for i in chosen(per_class=3)) == {0: 3, 1: 3, 2: 3}
    assert chosen() == set(IDS)  # no budget: every labelled row


def test_label_split_moves_hidden_labels_to_the_pool(demo_dataset):
    split = label_split(demo_dataset, DataConfig(path=demo_dataset, label_fraction=0.2))
    train = read_split(demo_dataset, "train", ["id", "label"]).to_pylist()
    labelled = {r["id"]: r["label"] for r in train if r["label"] is not None}
    unlabelled = {r["id"] for r in train if r["label"] is None}
    assert set(split.labeled_ids) <= set(labelled)
    assert [labelled[i] for i in split.labeled_ids] == split.labeled_targets.tolist()
    hidden = set(labelled) - set(split.labeled_ids)
    assert split.pool_truth == {i: labelled[i] for i in hidden}  # their true labels, for pseudo-label precision
    assert set(split.pool_ids) >= hidden | unlabelled and not set(split.pool_ids) & set(split.labeled_ids)
    held_out = {i for s in ("val", "test") for i in read_split(demo_dataset, s, ["id"]).column("id").to_pylist()}
    assert not set(split.pool_ids) & held_out
