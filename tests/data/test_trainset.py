"""A round's training set: the named rows copied out of the dataset, labels and weights, one-hot targets."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysemi.data.shards import DatasetError, read_manifest, read_split
from raysemi.data.trainset import write_trainset


@pytest.fixture(scope="module")
def rows(demo_dataset):
    train = read_split(demo_dataset, "train", ["id", "label"]).to_pylist()
    labelled = [r for r in train if r["label"] is not None][:12]
    unlabelled = [r for r in train if r["label"] is None][:4]
    picked = {r["id"]: (r["label"], 1.0) for r in labelled}
    picked.update({r["id"]: (0, 0.5) for r in unlabelled})  # pseudo-labels: class 0, weight 0.5
    return picked


def test_rows_are_found_with_their_labels_and_weights(demo_dataset, rows, tmp_path):
    manifest = read_manifest(demo_dataset)
    ts = write_trainset(demo_dataset, manifest, rows, str(tmp_path / "ts"), num_shards=3)
    table = pq.read_table(tmp_path / "ts")
    assert sorted(table.column("id").to_pylist()) == sorted(rows) and len(ts.uris) == 3
    assert ts.total == len(rows) and sum(ts.rows) == len(rows) and not ts.soft
    got = {r["id"]: (r["label"], r["weight"]) for r in table.select(["id", "label", "weight"]).to_pylist()}
    assert got == rows
    assert all(len(b) > 0 for b in table.column("image").to_pylist())
    assert ts.class_counts == np.bincount([y for y, _ in rows.values()], minlength=manifest.num_classes).tolist()


def test_soft_targets_are_one_hot_unless_given(demo_dataset, rows, tmp_path):
    manifest = read_manifest(demo_dataset)
    first = sorted(rows)[0]
    given = {first: [0.2, 0.5, 0.3]}
    ts = write_trainset(demo_dataset, manifest, rows, str(tmp_path / "ts"), num_shards=2, targets=given)
    table = pq.read_table(tmp_path / "ts")
    assert ts.soft
    for r in table.select(["id", "label", "target"]).to_pylist():
        want = given.get(r["id"]) or np.eye(manifest.num_classes)[r["label"]].tolist()
        assert np.allclose(r["target"], want)


def test_missing_ids_and_an_empty_set_are_refused(demo_dataset, rows, tmp_path):
    manifest = read_manifest(demo_dataset)
    with pytest.raises(DatasetError, match="2 training rows were not found"):
        write_trainset(demo_dataset, manifest, {**rows, "nope1": (0, 1.0), "nope2": (1, 1.0)}, str(tmp_path / "a"), 2)
    val_id = read_split(demo_dataset, "val", ["id"]).column("id")[0].as_py()
    with pytest.raises(DatasetError, match="1 training rows were not found"):  # val rows are not train rows
        write_trainset(demo_dataset, manifest, {**rows, val_id: (0, 1.0)}, str(tmp_path / "b"), 2)
    with pytest.raises(DatasetError, match="empty"):
        write_trainset(demo_dataset, manifest, {}, str(tmp_path / "c"), 2)


def test_repeats_write_copies_and_count_them(demo_dataset, rows, tmp_path):
    manifest = read_manifest(demo_dataset)
    first = sorted(rows)[0]
    ts = write_trainset(demo_dataset, manifest, rows, str(tmp_path / "ts"), num_shards=3, repeats={first: 3})
    table = pq.read_table(str(tmp_path / "ts"))
    ids = table.column("id").to_pylist()
    assert ts.total == len(rows) + 2 and ids.count(first) == 3
    assert sum(ts.class_counts) == ts.total
    assert ts.class_counts[rows[first][0]] == sum(1 for v in rows.values() if v[0] == rows[first][0]) + 2


def test_labeled_repeats_reach_the_share():
    from raysemi.pipeline import labeled_repeats

    assert labeled_repeats(267, 719, 0.5) == 3  # 801 true-label rows next to 719 pseudo-labels
    assert labeled_repeats(267, 719, 0.0) == 1
    assert labeled_repeats(267, 0, 0.5) == 1  # round 0: nothing to balance
    assert labeled_repeats(1000, 100, 0.5) == 1  # never fewer than one copy
    n = labeled_repeats(48, 514, 0.75)
    assert abs(48 * n / (48 * n + 514) - 0.75) < 0.02
