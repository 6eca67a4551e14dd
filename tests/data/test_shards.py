"""The data contract: shards + manifest round-trip locally and on S3, atomic writes, rank assignment."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from raysemi.core import io as rio
from raysemi.data import shards
from raysemi.data.shards import DatasetError, Manifest, SplitInfo


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": [f"id{i}" for i in range(start, start + n)],
            "image": [bytes([i % 256]) * 10 for i in range(start, start + n)],
            "label": pa.array([None if i % 5 == 0 else i % 3 for i in range(start, start + n)], pa.int16()),
            "group": pa.array([f"p{i // 2}" for i in range(start, start + n)], pa.string()),
            "source": [f"img/{i}.png" for i in range(start, start + n)],
        },
        schema=shards.SCHEMA,
    )


def _all_files(root: str) -> list[str]:
    fs, path = rio.filesystem(root)
    fs.invalidate_cache()
    return list(fs.find(path))


def _roundtrip(root: str) -> None:
    infos = [shards.write_shard(root, f"train/part-{i:05d}.parquet", _table(10, 10 * i)) for i in range(3)]
    manifest = Manifest(
        classes=["a", "b", "c"],
        splits={"train": SplitInfo(rows=30, labeled=sum(i.labeled for i in infos), shards=infos)},
    )
    assert not shards.dataset_exists(root)
    shards.write_manifest(root, manifest)
    assert shards.dataset_exists(root)

    back = shards.read_manifest(root)
    assert back == manifest
    assert [s.rows for s in back.splits["train"].shards] == [10, 10, 10]
    assert back.splits["train"].labeled == 24
    fs, _ = rio.filesystem(root)
    for info, uri in zip(infos, back.shard_uris(root, "train")):
        with fs.open(rio.filesystem(uri)[1], "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == info.sha256
    table = shards.read_split(root, "train")
    assert table.equals(pa.concat_tables([_table(10, 0), _table(10, 10), _table(10, 20)]))
    assert shards.read_split(root, "train", columns=["id", "label"]).column_names == ["id", "label"]
    assert not [f for f in _all_files(root) if ".tmp-" in f]
    with pytest.raises(DatasetError, match="no split 'val'"):
        back.shard_uris(root, "val")

    shards.remove_dataset(root)
    assert not shards.dataset_exists(root)
    assert not [f for f in _all_files(root) if f.endswith(".parquet")]


def test_roundtrip_local(tmp_path):
    _roundtrip(str(tmp_path / "ds"))


def test_roundtrip_s3(s3_bucket):
    _roundtrip(f"{s3_bucket}/some/prefix")


def test_folder_without_manifest_is_not_a_dataset(tmp_path, s3_bucket):
    shards.write_shard(str(tmp_path), "train/part-00000.parquet", _table(4))
    with pytest.raises(DatasetError, match="no manifest.json"):
        shards.read_manifest(str(tmp_path))
    with pytest.raises(DatasetError, match="no manifest.json"):
        shards.read_split(str(tmp_path), "train")
    with pytest.raises(DatasetError, match="no manifest.json"):
        shards.read_manifest(f"{s3_bucket}/nothing-here")


def test_manifest_json_errors(tmp_path):
    m = Manifest(
        classes=["x"], splits={"train": SplitInfo()}, quarantined={"zero bytes": 1}
    )
    assert Manifest.from_json(m.to_json()) == m
    # Format 1 listed the quarantined inputs in the manifest: read as their counts by reason.
    old = json.loads(m.to_json())
    old.pop("quarantined")
    old.update(format_version=1, quarantine=[{"source": "a", "reason": "zero bytes"},
                                             {"source": "b", "reason": "over pixel limit (9 x 9)"}])
    assert Manifest.from_json(json.dumps(old)).quarantined == {"over pixel limit": 1, "zero bytes": 1}
    (tmp_path / "manifest.json").write_text(
        m.to_json().replace('"format_version": 2', '"format_version": 99')
    )
    with pytest.raises(DatasetError, match="format 99"):
        shards.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="malformed"):
        shards.read_manifest(str(tmp_path))


def test_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    def broken_mv(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LocalFileSystem, "mv", broken_mv)
    with pytest.raises(OSError, match="disk full"):
        shards.write_shard(str(tmp_path), "train/part-00000.parquet", _table(3))
    assert list((tmp_path / "train").iterdir()) == []


def test_write_to_missing_bucket_does_not_create_it(s3_server):
    import s3fs

    bucket = "raysemi-no-such-bucket"
    with pytest.raises(OSError):
        shards.write_shard(f"s3://{bucket}/ds", "train/part-00000.parquet", _table(3))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    assert not fs.exists(bucket)


def test_assign_shards():
    names = [f"s{i}" for i in range(10)]
    parts = [shards.assign_shards(names, r, 3) for r in range(3)]
    assert parts == [["s0", "s3", "s6", "s9"], ["s1", "s4", "s7"], ["s2", "s5", "s8"]]
    assert sorted(n for part in parts for n in part) == sorted(names)
    assert shards.assign_shards(names, 0, 1) == names
    with pytest.raises(DatasetError, match="cannot feed 4 workers"):
        shards.assign_shards(names[:3], 0, 4)
    for rank, world in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            shards.assign_shards(names, rank, world)


def test_steps_per_epoch_and_batch_split():
    # rank 0 gets shards 0 and 2 (100 + 50 rows), rank 1 shards 1 and 3 (80 + 30): the smaller one decides.
    assert shards.steps_per_epoch([100, 80, 50, 30], 2, 16) == 110 // 16
    assert shards.steps_per_epoch([64], 1, 64) == 1
    with pytest.raises(DatasetError, match="larger than"):
        shards.steps_per_epoch([100, 10], 2, 16)
    assert shards.split_batch(256, 3) == 85
    with pytest.raises(ValueError):
        shards.split_batch(2, 4)
