"""Ingest: image folders, npz, CSV, unlabeled images, group-disjoint splits, duplicates, bad input, S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysemi.core import io as rio
from raysemi.data import shards
from raysemi.data.ingest.run import ingest
from raysemi.data.ingest.summary import summarize
from raysemi.data.shards import DatasetError
from tests.conftest import point_s3_at
from tests.moto_s3 import moto_s3


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def image_bytes(seed: int, fmt: str = "PNG", size: int = 16) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8), fmt)


def make_folder(
    root: Path, counts: dict[str, int], *, seed: int = 0, name="img{i:03d}.png"
) -> dict[str, str]:
    """``root/<class>/<name>`` with distinct images; returns {sha256: class}."""
    truth = {}
    for k, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            data = image_bytes(seed * 100_000 + k * 1000 + i, "JPEG" if i % 3 == 0 else "PNG")
            (root / cls / name.format(i=i, cls=cls)).write_bytes(data)
            truth[hashlib.sha256(data).hexdigest()] = cls
    return truth


def rows(dest: str, split: str) -> list[dict]:
    return shards.read_split(dest, split).to_pylist()


def no_dataset(dest: Path | str) -> bool:
    return not shards.dataset_exists(str(dest))


def test_folder_without_splits(tmp_path):
    truth = make_folder(tmp_path / "src", {"cat": 20, "ant": 30, "bee": 10})
    (tmp_path / "src" / "README.md").write_text("ignored: not in a class folder")
    m = ingest(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    assert m.classes == ["ant", "bee", "cat"]
    assert {s: m.splits[s].rows for s in shards.SPLITS} == {"train": 48, "val": 6, "test": 6, "unlabeled": 0}
    assert m.splits["val"].label_counts == {"ant": 3, "bee": 1, "cat": 2}  # stratified: 10% of each class
    assert [len(m.splits[s].shards) for s in shards.SPLITS] == [4, 4, 4, 0]
    assert m.extra["carved"] == {"val": 0.1, "test": 0.1} and m.extra["inputs"] == 60
    assert shards.read_manifest(str(tmp_path / "ds")) == m
    seen = []
    for split in ("train", "val", "test"):
        for r in rows(str(tmp_path / "ds"), split):
            assert r["id"] == hashlib.sha256(r["image"]).hexdigest()
            assert m.classes[r["label"]] == truth[r["id"]] == r["source"].split("/")[0]
            seen.append(r["id"])
    assert sorted(seen) == sorted(truth)
    text = summarize(m)
    assert "60 images stored" in text and "quarantined: 0" in text and "duplicates dropped: 0" in text


def test_folder_with_splits_and_unlabeled(tmp_path):
    src = tmp_path / "src"
    make_folder(src / "train", {"a": 8, "b": 6}, seed=1)
    make_folder(src / "val", {"a": 2, "b": 2}, seed=2)
    make_folder(src / "test", {"a": 3, "b": 1}, seed=3)
    unl = tmp_path / "more"
    for i in range(5):
        (unl / "x").mkdir(parents=True, exist_ok=True)
        (unl / "x" / f"u{i}.png").write_bytes(image_bytes(900 + i))
    (src / "unlabeled").mkdir()
    (src / "unlabeled" / "u.jpg").write_bytes(image_bytes(999, "JPEG"))
    m = ingest(str(src), str(tmp_path / "ds"), unlabeled=str(unl), progress=False, min_shards=2)
    assert {s: m.splits[s].rows for s in shards.SPLITS} == {"train": 14, "val": 4, "test": 4, "unlabeled": 6}
    assert m.splits["test"].label_counts == {"a": 3, "b": 1}
    assert m.extra["carved"] == {} and m.extra["splits_from_source"] == ["test", "train", "val"]
    unlabeled = rows(str(tmp_path / "ds"), "unlabeled")
    assert all(r["label"] is None for r in unlabeled)
    assert sorted(r["source"] for r in unlabeled)[:2] == ["unlabeled/u.jpg", "unlabeled:x/u0.png"]
    assert m.splits["unlabeled"].labeled == 0 and m.splits["train"].labeled == 14


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, (12, 1)),
        "test_images": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
        "test_labels": np.array([0, 1, 2, 2, 1]),
        "label_names": np.array(["normal", "benign", "malignant"]),
    }
    np.savez(tmp_path / "d.npz", **arrays)
    m = ingest(str(tmp_path / "d.npz"), str(tmp_path / "ds"), progress=False, val_fraction=0.25)
    assert m.classes == ["normal", "benign", "malignant"]
    assert m.extra["carved"] == {"val": 0.25}  # the npz has test, not val
    assert m.splits["test"].rows == 5 and m.splits["train"].rows + m.splits["val"].rows == 12
    for r in rows(str(tmp_path / "ds"), "test"):
        i = int(r["source"].split(":")[2])
        assert r["source"].startswith("npz:test:") and r["label"] == arrays["test_labels"][i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["image"]))), arrays["test_images"][i])


def test_npz_missing_keys(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="no 'train_images' key"):
        ingest(str(tmp_path / "a.npz"), str(tmp_path / "ds"), progress=False)
    np.savez(tmp_path / "b.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="no 'train_labels' key"):
        ingest(str(tmp_path / "b.npz"), str(tmp_path / "ds"), progress=False)
    np.savez(tmp_path / "c.npz", train_images=np.zeros((2, 4, 4), np.float32), train_labels=np.zeros(2, int))
    with pytest.raises(DatasetError, match="expected uint8"):
        ingest(str(tmp_path / "c.npz"), str(tmp_path / "ds"), progress=False)
    np.savez(tmp_path / "d.npz", train_images=np.zeros((2, 4, 4, 2), np.uint8), train_labels=np.zeros(2, int))
    with pytest.raises(DatasetError, match="expected uint8"):
        ingest(str(tmp_path / "d.npz"), str(tmp_path / "ds"), progress=False)
    np.savez(
        tmp_path / "e.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 3), int)
    )
    with pytest.raises(DatasetError, match="multi-label"):
        ingest(str(tmp_path / "e.npz"), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()


def test_csv_with_split_column(tmp_path):
    lines = ["label,path,split"]
    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i, "JPEG"))
        lines.append(f"{'ab'[i % 2]},{i}.jpg,{['train', 'train', 'test', ''][i % 4]}")
    (tmp_path / "l.csv").write_text("\n".join(lines))
    m = ingest(str(tmp_path / "l.csv"), str(tmp_path / "ds"), progress=False, val_fraction=0.25)
    assert m.splits["test"].rows == 3 and m.splits["test"].label_counts == {"a": 3, "b": 0}
    assert m.extra["splits_from_source"] == ["test", "train"] and m.extra["carved"] == {"val": 0.25}
    assert m.splits["train"].rows == 6 and m.splits["val"].label_counts == {"a": 1, "b": 2}  # 25% of 3 a, 6 b


def test_csv_with_group_column(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    lines = ["path,label,group"]
    for i in range(60):
        (img / f"{i}.png").write_bytes(image_bytes(i))
        label = "" if i >= 54 else str([2, 10, 1][i % 3])
        lines.append(f"img/{i}.png,{label},patient{i // 4}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    m = ingest(
        str(tmp_path / "list.csv"), str(tmp_path / "ds"), progress=False, val_fraction=0.2, test_fraction=0.2
    )
    assert m.classes == ["1", "2", "10"]  # integer labels sort as numbers, kept as strings
    assert m.splits["unlabeled"].rows == 6
    groups = {s: {r["group"] for r in rows(str(tmp_path / "ds"), s)} for s in ("train", "val", "test")}
    assert not (
        groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"]
    )
    assert sum(len(g) for g in groups.values()) == 14  # patients 0..13 hold labeled rows
    for r in rows(str(tmp_path / "ds"), "train"):
        i = int(Path(r["source"]).stem)
        assert m.classes[r["label"]] == str([2, 10, 1][i % 3]) and r["group"] == f"patient{i // 4}"


def test_csv_without_header_and_missing_file(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(1))
    (tmp_path / "l.csv").write_text("a.png,x\nmissing/b.png,y\n")
    with pytest.raises(DatasetError, match=r"1 missing file\(s\), e.g. missing/b.png"):
        ingest(str(tmp_path / "l.csv"), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()
    (tmp_path / "l.csv").write_text("a.png,x\n")
    m = ingest(str(tmp_path / "l.csv"), str(tmp_path / "ds"), progress=False)
    assert m.classes == ["x"] and m.splits["train"].rows == 1


def test_group_regex_keeps_patients_on_one_side(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    n = 0
    for cls in ("neg", "pos"):
        (src / cls).mkdir(parents=True)
        for _ in range(25):
            pid = n
            for k in range(int(rng.integers(1, 6))):
                (src / cls / f"P{pid:03d}_scan{k}.png").write_bytes(image_bytes(10_000 + n * 10 + k))
            n += 1
    m = ingest(str(src), str(tmp_path / "ds"), group_regex=r"^(P\d+)_", seed=3, progress=False)
    where: dict[str, set] = {}
    for split in ("train", "val", "test"):
        for r in rows(str(tmp_path / "ds"), split):
            assert r["group"] == r["source"].split("/")[1].split("_")[0]
            where.setdefault(r["group"], set()).add(split)
    assert len(where) == 50 and all(len(s) == 1 for s in where.values())
    assert m.splits["val"].rows > 0 and m.splits["test"].rows > 0
    assert all(m.splits[s].label_counts["pos"] > 0 for s in ("train", "val", "test"))  # stratified
    again = ingest(str(src), str(tmp_path / "ds2"), group_regex=r"^(P\d+)_", seed=3, progress=False)
    assert [s.sha256 for s in again.splits["val"].shards] == [s.sha256 for s in m.splits["val"].shards]
    with pytest.raises(DatasetError, match="matches none"):
        ingest(str(src), str(tmp_path / "ds3"), group_regex=r"^(Q\d+)_", progress=False)


def test_symlinks_out_of_the_source_are_listed_not_read(tmp_path):
    from raysemi.data.sources import OUTSIDE_LINK

    src = tmp_path / "src"
    make_folder(src, {"a": 10, "b": 10})
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    secret = image_bytes(900)
    (outside / "secret.png").write_bytes(secret)
    (outside / "dir" / "more.png").write_bytes(image_bytes(901))
    (src / ".hidden").mkdir()
    inside = image_bytes(902)
    (src / ".hidden" / "x.png").write_bytes(inside)
    (src / "a" / "escape.png").symlink_to(outside / "secret.png")
    (src / "b" / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    (src / "a" / "inside.png").symlink_to(src / ".hidden" / "x.png")  # within the tree: fine

    m = ingest(str(src), str(tmp_path / "ds"), progress=False, min_shards=1)
    stored = {r["id"] for s in ("train", "val", "test") for r in rows(str(tmp_path / "ds"), s)}
    assert hashlib.sha256(inside).hexdigest() in stored
    assert hashlib.sha256(secret).hexdigest() not in stored and len(stored) == 21
    quarantine = shards.read_quarantine(str(tmp_path / "ds")).to_pylist()
    assert sorted((q["source"], q["reason"]) for q in quarantine) == [
        ("a/escape.png", OUTSIDE_LINK), ("b/linkdir", OUTSIDE_LINK)]
    assert "symbolic link out of the source folder" in summarize(m)

    m = ingest(str(src), str(tmp_path / "ds2"), progress=False, min_shards=1, follow_symlinks=True)
    stored = {r["id"] for s in ("train", "val", "test") for r in rows(str(tmp_path / "ds2"), s)}
    assert hashlib.sha256(secret).hexdigest() in stored and len(stored) == 23 and m.quarantined == {}
    assert shards.read_quarantine(str(tmp_path / "ds2")).num_rows == 0


def test_duplicates_are_stored_once(tmp_path):
    src = tmp_path / "src"
    make_folder(src, {"a": 5, "b": 5})
    shutil.copy(src / "a" / "img000.png", src / "a" / "zzz_copy.png")  # same label: a duplicate
    shutil.copy(src / "a" / "img001.png", src / "a" / "zzz_copy2.png")
    shutil.copy(src / "a" / "img002.png", src / "b" / "zzz_conflict.png")  # other label: quarantined
    m = ingest(str(src), str(tmp_path / "ds"), progress=False)
    stored = sum(s.rows for s in m.splits.values())
    quarantine = shards.read_quarantine(str(tmp_path / "ds")).to_pylist()
    assert (stored, m.duplicates, len(quarantine), m.quarantined_total) == (10, 2, 1, 1)
    assert quarantine[0]["source"] == "b/zzz_conflict.png"
    assert quarantine[0]["reason"].startswith("duplicate with conflicting label")
    assert m.quarantined == {"duplicate with conflicting label": 1}
    assert stored + m.duplicates + len(quarantine) == m.extra["inputs"] == 13
    ids = [r["id"] for s in ("train", "val", "test") for r in rows(str(tmp_path / "ds"), s)]
    assert len(ids) == len(set(ids)) == 10


def test_bad_inputs_raise_and_leave_no_manifest(tmp_path):
    src = tmp_path / "src"
    make_folder(src, {"a": 3, "b": 3})
    dest = tmp_path / "ds"
    with pytest.raises(DatasetError, match="does not exist"):
        ingest(str(tmp_path / "nope"), str(dest), progress=False)
    (tmp_path / "list.txt").write_text("hello")
    with pytest.raises(DatasetError, match="unknown source format"):
        ingest(str(tmp_path / "list.txt"), str(dest), progress=False)
    with pytest.raises(DatasetError, match="unknown format"):
        ingest(str(src), str(dest), fmt="jpeg", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        ingest(str(tmp_path / "empty"), str(dest), progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match="cannot write"):
        ingest(str(src), str(tmp_path / "afile" / "ds"), progress=False)
    with pytest.raises(DatasetError, match="overlaps the source"):
        ingest(str(src), str(src / "ds"), progress=False)
    with pytest.raises(DatasetError, match="fractions"):
        ingest(str(src), str(dest), val_fraction=0.6, test_fraction=0.5, progress=False)
    assert no_dataset(dest) and not dest.exists()

    ingest(str(src), str(dest), progress=False)
    before = (dest / "manifest.json").read_text()
    with pytest.raises(DatasetError, match="already holds a dataset.*--overwrite"):
        ingest(str(src), str(dest), progress=False)
    assert (dest / "manifest.json").read_text() == before
    # The user's files beside the dataset and inside a split folder survive --overwrite.
    (dest / "NOTES.md").write_text("mine")
    (dest / "train" / "my-labels.csv").write_text("mine")
    m = ingest(str(src), str(dest), progress=False, overwrite=True, min_shards=1)
    parts = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.parquet"))
    # Old shards are gone; the quarantine list (empty here) sits beside the manifest.
    assert parts == sorted(["quarantine.parquet", *(s.path for sp in m.splits.values() for s in sp.shards)])
    assert (dest / "NOTES.md").read_text() == "mine" and (dest / "train" / "my-labels.csv").read_text() == "mine"
    # A dataset raysemi cannot tell it wrote (no marker: an older raysemi, or the user's own files) is refused.
    (dest / ".raysemi-output").unlink()
    with pytest.raises(DatasetError, match="holds a dataset \\(manifest.json\\) but no raysemi marker"):
        ingest(str(src), str(dest), progress=False, overwrite=True, min_shards=1)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.parquet")) == parts


def test_missing_bucket(s3_server, tmp_path):
    import s3fs

    make_folder(tmp_path / "src", {"a": 2, "b": 2})
    with pytest.raises(DatasetError, match="bucket 'raysemi-missing-bucket' does not exist"):
        ingest(str(tmp_path / "src"), "s3://raysemi-missing-bucket/ds", progress=False)
    assert not s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).exists("raysemi-missing-bucket")


def test_bucket_that_refuses_access(s3_bucket, tmp_path, monkeypatch):
    import s3fs

    def denied(self, path, *args, **kwargs):
        raise PermissionError(f"AccessDenied: {path}")

    make_folder(tmp_path / "src", {"a": 2, "b": 2})
    monkeypatch.setattr(s3fs.S3FileSystem, "pipe_file", denied)
    with pytest.raises(DatasetError, match="cannot write to .*: access denied"):
        ingest(str(tmp_path / "src"), f"{s3_bucket}/ds", progress=False)
    assert no_dataset(f"{s3_bucket}/ds")


@pytest.fixture
def own_s3(monkeypatch):
    """A private moto server that the test may stop or kill (the session's is shared), with S3 timeouts of 1 s
    and 2 tries per request; yields (its process, a bucket on it)."""
    pytest.importorskip("moto")
    import s3fs

    with moto_s3() as server:  # stopped on exit, continued first if the test froze it
        point_s3_at(monkeypatch, server.endpoint)  # also drops the s3fs clients of the session's endpoint
        try:
            s3fs.S3FileSystem().mkdir("raysemi-own")
            yield server.proc, "s3://raysemi-own"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def signal_after_first_shard(monkeypatch, proc, sig: int) -> None:
    """Send ``sig`` to the S3 server once the first shard is stored: the server dies (or freezes) mid-ingest."""
    real = shards.write_shard
    sent = threading.Lock()

    def first_then_signal(*args, **kwargs):
        info = real(*args, **kwargs)
        if sent.acquire(blocking=False):
            os.kill(proc.pid, sig)
        return info

    monkeypatch.setattr(shards, "write_shard", first_then_signal)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("raysemi ingest: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_s3_server_dying_mid_ingest_is_one_line_saying_what_is_left(own_s3, tmp_path, monkeypatch, capsys):
    from raysemi.commands.cli import main

    proc, bucket = own_s3
    make_folder(tmp_path / "src", {"a": 10, "b": 10})
    signal_after_first_shard(monkeypatch, proc, signal.SIGKILL)
    assert main(["ingest", str(tmp_path / "src"), f"{bucket}/ds", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"writing {bucket}/ds failed: cannot reach S3 (Could not connect to the endpoint URL" in line
    assert f"partial shards may be left under {bucket}/ds/<split>/ (removing them failed too" in line
    assert "the next ingest to this destination removes them" in line


@pytest.mark.timeout(90, method="thread")  # unbounded, it waited forever: end the run loudly instead
def test_s3_server_frozen_mid_ingest_fails_in_a_bounded_time(own_s3, tmp_path, monkeypatch, capsys):
    from raysemi.commands.cli import main

    proc, bucket = own_s3
    make_folder(tmp_path / "src", {"a": 10, "b": 10})
    signal_after_first_shard(monkeypatch, proc, signal.SIGSTOP)
    start = time.monotonic()
    assert main(["ingest", str(tmp_path / "src"), f"{bucket}/ds", "--quiet"]) == 2
    assert time.monotonic() - start < 45  # a few rounds of 2 tries x 1 s, 4 writers at once
    line = one_error_line(capsys)
    assert f"writing {bucket}/ds failed: S3 did not answer within 1 s (connect) / 1 s (read), 2 tries" in line
    assert "partial shards may be left under" in line
    # What the message says holds once the server is back: no dataset, and the next ingest removes the rest.
    proc.send_signal(signal.SIGCONT)
    assert no_dataset(f"{bucket}/ds")
    m = ingest(str(tmp_path / "src"), f"{bucket}/ds", progress=False)
    fs, root = rio.filesystem(f"{bucket}/ds")
    fs.invalidate_cache()
    assert sorted(p[len(root) + 1:] for p in fs.find(root) if p.endswith(".parquet")) == \
        sorted(["quarantine.parquet", *(sh.path for sp in m.splits.values() for sh in sp.shards)])  # no staging left


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    make_folder(tmp_path / "src", {"a": 10, "b": 10})
    real = shards.write_shard
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("connection reset")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", flaky)
    with pytest.raises(DatasetError, match="connection reset"):
        ingest(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    assert no_dataset(tmp_path / "ds")
    assert [p for p in (tmp_path / "ds").rglob("*") if p.is_file()] == []


def test_local_and_s3_are_identical(tmp_path, s3_bucket):
    make_folder(tmp_path / "src", {"a": 12, "b": 9})
    local = ingest(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    remote = ingest(str(tmp_path / "src"), f"{s3_bucket}/data/ds", progress=False)
    assert shards.read_manifest(f"{s3_bucket}/data/ds") == remote
    for split in shards.SPLITS:
        assert local.splits[split].shards == remote.splits[split].shards  # same paths, rows, sha256
        assert shards.read_split(str(tmp_path / "ds"), split).equals(
            shards.read_split(f"{s3_bucket}/data/ds", split)
        )
    fs, path = rio.filesystem(f"{s3_bucket}/data/ds")
    assert not [f for f in fs.find(path) if ".tmp-" in f or "probe" in f]
    with pytest.raises(DatasetError, match="already holds a dataset"):
        ingest(str(tmp_path / "src"), f"{s3_bucket}/data/ds", progress=False)


@pytest.mark.realdata
@pytest.mark.slow
def test_covid_local_and_s3(covid_dir, tmp_path, s3_bucket):
    # Independent count: unique file contents per class folder (exact copies are stored once).
    unique: dict[str, set] = {}
    files = 0
    for f in covid_dir.glob("*/*"):
        unique.setdefault(f.parent.name, set()).add(hashlib.sha256(f.read_bytes()).hexdigest())
        files += 1
    local = ingest(str(covid_dir), str(tmp_path / "covid"), progress=False)
    remote = ingest(str(covid_dir), f"{s3_bucket}/covid", progress=False)
    assert local.classes == sorted(unique) == ["COVID", "Normal", "Viral_Pneumonia"]
    assert local.quarantined == {} and files == 3330
    stored = Counter()
    for split in ("train", "val", "test"):
        stored.update(local.splits[split].label_counts)
    assert stored == {cls: len(ids) for cls, ids in unique.items()}  # 992 / 1000 / 1338 less any copies
    assert sum(stored.values()) + local.duplicates == files
    ids = set()
    for split in ("train", "val", "test"):
        table = shards.read_split(str(tmp_path / "covid"), split, columns=["id"])
        ids |= set(table.column("id").to_pylist())
        remote_table = shards.read_split(f"{s3_bucket}/covid", split, columns=["id"])
        assert remote_table.equals(table)
    assert ids == set().union(*unique.values())
    for split in shards.SPLITS:  # same shard files (paths, rows, sha256 of the bytes) in both places
        assert local.splits[split].shards == remote.splits[split].shards
    assert json.loads(local.to_json())["splits"] == json.loads(remote.to_json())["splits"]
    same_rows_as_before_on(str(tmp_path / "covid"))


def same_rows_as_before_on(root: str) -> None:
    """On a real set: the label choice, the pool and a round's selection (on stand-in predictions with many
    ties) are the rows the sorted-list implementations chose (the recorded figures stay valid)."""
    import pyarrow as pa
    import torch

    from raysemi.core.config import DataConfig
    from raysemi.data.labels import label_split
    from raysemi.data.shards import local_map, read_manifest, read_shard
    from raysemi.stages import commits, pool
    from raysemi.stages.selection import selection_prior
    from tests.data.test_labels import reference
    from tests.stages.test_selection import select_pseudo_labels

    manifest = read_manifest(root)
    train = shards.read_split(root, "train", ["id", "label"])
    ids, labels = train.column("id").to_pylist(), train.column("label").to_pylist()
    for fraction, per_class in ((0.1, None), (None, 10)):
        data = DataConfig(path=root, label_fraction=fraction, labels_per_class=per_class)
        split = label_split(root, data, manifest)
        kept = set(train.filter(pa.array(split.rule.chosen(train))).column("id").to_pylist())
        assert kept == reference(ids, labels, fraction, per_class, 0)
    pool_ids = set(ids) - kept
    rng = np.random.default_rng(0)
    pred_uri = f"{root}/stand-in-predictions"
    for index, shard in enumerate(pool.pool_shards(root, manifest)):
        t = read_shard(shard.uri, ["id"])
        probs = torch.softmax(torch.from_numpy(rng.integers(0, 5, (t.num_rows, 3)).astype(np.float32)), 1).numpy()
        preds = pa.table({"id": t.column("id"), "pred": pa.array(probs.argmax(1), pa.int16()),
                          "confidence": pa.array(probs.max(1)), "probs": pa.array(list(probs), pa.list_(pa.float32()))})
        commits.commit(pred_uri, index, shard.uri, preds, "m" * 64, input_ids=t.column("id"))
    assert split.pool_rows == len(pool_ids)
    shards_ = pool.pool_shards(root, manifest, pred_uri)
    prior = selection_prior("prior", split.labeled_counts)
    rule, _ = pool.select(shards_, pool.PoolView(split.rule, 3, 0.0), 600, prior, local_map)
    chosen = set()
    for shard in shards_:
        cands = pool.PoolView(split.rule, 3, 0.0).candidates(shard)
        chosen |= set(cands.filter(pa.array(rule.chosen(cands))).column("id").to_pylist())
    want = select_pseudo_labels(commits.read_predictions(pred_uri), pool_ids, 600, 3, prior=prior)
    assert chosen == set(want.column("id").to_pylist()) and len(chosen) == 600
