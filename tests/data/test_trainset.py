"""A round's training set: the chosen rows copied out of the dataset by tasks, in equal parts, images read by
row group; labels, weights, one-hot targets; the labelled parts listed again for their copies."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysemi.core.config import DataConfig
from raysemi.core.io import write_bytes_atomic
from raysemi.data.labels import label_split
from raysemi.data.shards import DatasetError, read_manifest, read_shard, table_bytes
from raysemi.data.trainset import (
    LabeledRows,
    SourceShard,
    TrainSet,
    plan_parts,
    read_images,
    read_trainset,
    write_trainset,
)


def train_shards(root: str) -> list[SourceShard]:
    manifest = read_manifest(root)
    return [SourceShard(u, "train", s.rows) for u, s in
            zip(manifest.shard_uris(root, "train"), manifest.splits["train"].shards)]


@pytest.fixture(scope="module")
def labels(demo_dataset):
    return label_split(demo_dataset, DataConfig(path=demo_dataset, label_fraction=0.3), read_manifest(demo_dataset))


def test_the_chosen_labels_are_copied_with_their_images_in_equal_parts(demo_dataset, labels, tmp_path):
    manifest = read_manifest(demo_dataset)
    out = str(tmp_path / "ts")
    ts = write_trainset(LabeledRows(labels.rule, 3), train_shards(demo_dataset), out, min_parts=4)
    assert len(ts.uris) == 4 and max(ts.rows) - min(ts.rows) <= 1 and ts.total == labels.n_labeled
    assert ts.class_counts == labels.labeled_counts and not ts.soft
    assert read_trainset(out) == ts  # described last: a resumed run finds it
    table = pq.read_table(out)
    source = pa.concat_tables([read_shard(u) for u in manifest.shard_uris(demo_dataset, "train")])
    by_id = {r["id"]: r for r in source.select(["id", "image", "label"]).to_pylist()}
    for row in table.to_pylist():
        assert row["image"] == by_id[row["id"]]["image"] and row["label"] == by_id[row["id"]]["label"]
        assert row["weight"] == 1.0
    chosen = {i for u in manifest.shard_uris(demo_dataset, "train") for t in [read_shard(u, ["id", "label"])]
              for i in t.filter(pa.array(labels.rule.chosen(t))).column("id").to_pylist()}
    assert sorted(table.column("id").to_pylist()) == sorted(chosen)


def test_one_hot_targets_and_copies_of_the_labelled_parts(demo_dataset, labels, tmp_path):
    ts = write_trainset(LabeledRows(labels.rule, 3, soft=True), train_shards(demo_dataset), str(tmp_path / "ts"), 2)
    table = pq.read_table(tmp_path / "ts")
    assert np.array_equal(np.array(table.column("target").to_pylist()),
                          np.eye(3)[np.array(table.column("label").to_pylist())])
    pseudo = TrainSet(["p0", "p1"], [5, 6], [1, 4, 6], soft=True)
    both = ts.plus(pseudo, copies=3)
    assert both.uris == ts.uris * 3 + ["p0", "p1"] and both.total == 3 * ts.total + 11 and both.soft
    assert both.class_counts == [3 * a + b for a, b in zip(ts.class_counts, [1, 4, 6])]


def test_an_empty_choice_is_refused(demo_dataset, tmp_path):
    from raysemi.data.labels import LabelRule

    with pytest.raises(DatasetError, match="empty"):
        write_trainset(LabeledRows(LabelRule(0, (None, None, None)), 3), train_shards(demo_dataset),
                       str(tmp_path / "c"), 2)


def test_parts_cut_the_chosen_rows_evenly_across_shard_boundaries():
    plan = plan_parts([5, 0, 3, 10], 4)
    assert plan == [[(0, 0, 4)], [(0, 4, 5), (2, 0, 3), (3, 0, 1)], [(3, 1, 5)], [(3, 5, 10)]]  # 4, 5, 4, 5 rows
    assert plan_parts([2], 5) == [[(0, 0, 1)], [(0, 1, 2)]]  # never an empty part


def test_images_come_from_only_the_row_groups_that_hold_the_rows(tmp_path):
    n = 1500  # three row groups of 512 (table_bytes)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "image": [f"img{i}".encode() for i in range(n)]})
    uri = str(tmp_path / "s.parquet")
    write_bytes_atomic(uri, table_bytes(table))
    assert pq.ParquetFile(uri).metadata.num_row_groups == 3
    rows = np.array([3, 511, 512, 1499])
    assert read_images(uri, rows).to_pylist() == [f"img{i}".encode() for i in rows]
    assert read_images(uri, np.array([1024, 1030])).to_pylist() == [b"img1024", b"img1030"]


def test_a_second_set_in_the_same_folder_replaces_the_first(demo_dataset, labels, tmp_path):
    out = tmp_path / "ts"
    first = write_trainset(LabeledRows(labels.rule, 3), train_shards(demo_dataset), str(out), min_parts=6)
    (out / "notes.txt").write_text("mine")
    second = write_trainset(LabeledRows(labels.rule, 3), train_shards(demo_dataset), str(out), min_parts=2)
    assert len(first.uris) == 6 and len(second.uris) == 2
    assert sorted(p.name for p in out.iterdir()) == ["_trainset.json", "notes.txt", "part-00000.parquet",
                                                     "part-00001.parquet"]
    assert read_trainset(str(out)) == second
