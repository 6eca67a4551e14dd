"""What ``raysemi predict`` reads: listing SOURCE (folder, CSV, dataset, S3 prefix) streamed into Parquet
parts, and staging it resumably (in this process here: ``local_map``; tests/commands/test_predict.py runs it on
Ray)."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raysemi.core import io as rio
from raysemi.data import shards
from raysemi.data.inputs import listing as listing_mod
from raysemi.data.inputs import staging
from raysemi.data.inputs.chunks import chunk_uri, read_record
from raysemi.data.inputs.listing import InputError, list_source, read_listing, stream_listing
from raysemi.data.inputs.staging import rows_per_shard, stage_listing


def png(seed: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def streamed(source: str, dest: str | None = None):
    """``list_source`` then ``stream_listing`` into ``dest`` (a fresh folder when not given)."""
    return stream_listing(list_source(source), dest or tempfile.mkdtemp(prefix="listing-"))


def index_of(staged) -> list[dict]:
    """Every listed image's path, id and reason, from the chunk records (as the output tasks read them)."""
    rows = []
    for c in range(staged.chunks):
        r = read_record(staged.dest, c)
        rows += [{"path": p, "id": i, "reason": x} for p, i, x in zip(r["paths"], r["ids"], r["reasons"])]
    return rows


def test_folder_listing_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "2.PNG").write_bytes(png(2))
    (tmp_path / "1.jpg").write_bytes(b"whatever")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden" / "3.png").write_bytes(png(3))
    listing = streamed(str(tmp_path))
    assert listing.kind == "folder" and listing.ignored == 1 and listing.rows == 2
    images = read_listing(listing)
    assert [r.path for r in images] == ["1.jpg", "b/2.PNG"]
    assert images[1].uri == str(tmp_path / "b" / "2.PNG")
    assert read_listing(streamed(str(tmp_path / "1.jpg")))[0].path == "1.jpg"
    assert stream_listing(list_source(str(tmp_path)), None).fingerprint() == listing.fingerprint()
    (tmp_path / "4.png").write_bytes(png(4))
    assert streamed(str(tmp_path)).fingerprint() != listing.fingerprint()


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(InputError, match=r"no image files in .*\(1 other files ignored\)"):
        list_source(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="applies to an ingested dataset"):
        list_source(str(tmp_path / "empty"), split="test")
    (tmp_path / "list.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(InputError, match="needs a header with a 'path' column .*file, label"):
        list_source(str(tmp_path / "list.csv"))
    (tmp_path / "only-header.csv").write_text("path\n")
    with pytest.raises(InputError, match="no image files"):
        list_source(str(tmp_path / "only-header.csv"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(InputError, match="neither an image folder"):
        list_source(str(tmp_path / "x.bin"))


def test_dataset_listing_by_split(tmp_path):
    from tests.stages.test_pseudolabel import make_dataset

    root = str(tmp_path / "ds")
    uris = make_dataset(root, shards=3, rows=2)
    listing = list_source(root)
    assert listing.kind == "dataset" and [u for _, u, _ in listing.shards] == uris
    assert [s for s, _, _ in list_source(root, "unlabeled").shards] == ["unlabeled", "unlabeled"]
    with pytest.raises(InputError, match="has no split 'bogus'"):
        list_source(root, "bogus")


def test_csv_staging_lists_failures_dedups_and_resumes(tmp_path, monkeypatch):
    img = tmp_path / "img"
    img.mkdir()
    for i in range(5):
        (img / f"{i}.png").write_bytes(png(i))
    (img / "copy.png").write_bytes(png(0))  # the same bytes as 0.png
    (img / "cut.png").write_bytes(png(9)[:60])
    (img / "zero.png").write_bytes(b"")
    rows = ["0.png", "1.png", "copy.png", "cut.png", "gone.png", "2.png", "1.png", "zero.png", str(img / "3.png")]
    (img / "list.csv").write_text("label,path\n" + "".join(f"x,{r}\n" for r in rows))
    dest = str(tmp_path / "inputs")
    listing = streamed(str(img / "list.csv"), dest)
    assert listing.kind == "csv" and listing.rows == 8  # 1.png named twice: once
    assert rows_per_shard(8) == 1 and rows_per_shard(10_000) == staging.MAX_ROWS

    staged = stage_listing(listing, progress=False)
    index = index_of(staged)
    assert [r["path"] for r in index] == ["0.png", "1.png", "copy.png", "cut.png", "gone.png", "2.png", "zero.png",
                                          str(img / "3.png")]
    by_path = {r["path"]: r for r in index}
    assert by_path["copy.png"]["id"] == by_path["0.png"]["id"] == shards.image_id(png(0))
    assert {p: by_path[p]["reason"] for p in ("cut.png", "gone.png", "zero.png")} == {
        "cut.png": "truncated", "gone.png": "not found", "zero.png": "zero bytes"}
    assert staged.chunks == 8 and staged.reused == 0 and len(staged.shard_uris) == 4  # the copy stored once
    ids = [i for u in staged.shard_uris for i in shards.read_shard(u, ["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 4
    assert shards.read_shard(staged.shard_uris[0]).column("source").to_pylist() == ["0.png"]

    assert staged.copies == 1 and read_record(dest, 2)["owners"] == {shards.image_id(png(0)): 0}

    # A rerun reuses every committed chunk; a chunk whose record is lost is staged again, the same. (Chunk 2,
    # the copy, is written by its task and then emptied by the dedup pass, which alone sees every chunk.)
    rio.filesystem(dest)[0].rm(chunk_uri(dest, 2))
    written = []
    real = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", lambda *a, **k: written.append(a[1]) or real(*a, **k))
    again = stage_listing(listing, progress=False)
    assert (again.reused, written) == (7, ["part-00002.parquet"])
    assert index_of(again) == index and again.shard_uris == staged.shard_uris
    assert not os.path.exists(os.path.join(dest, "part-00002.parquet"))
    written.clear()
    assert stage_listing(listing, progress=False).reused == 8 and written == []


def test_s3_prefix_listing(s3_bucket):
    fs, _ = rio.filesystem(s3_bucket)
    for key in ("new/a.png", "new/sub/b.jpg", "new/notes.txt", "newer/c.png", "new/.trash/d.png"):
        fs.pipe(f"{s3_bucket}/{key}".removeprefix("s3://"), png(1))
    listing = streamed(f"{s3_bucket}/new")
    assert listing.kind == "prefix" and listing.ignored == 1
    assert [(r.path, r.uri) for r in read_listing(listing)] == [
        ("a.png", f"{s3_bucket}/new/a.png"), ("sub/b.jpg", f"{s3_bucket}/new/sub/b.jpg")]
    with pytest.raises(InputError, match="does not exist"):
        list_source(f"{s3_bucket}/nothing-here")


def test_streamed_listing_parts_folder_and_csv(tmp_path, monkeypatch):
    """Parts of a fixed size (small here), read back by range; links to folders entered once; a CSV read in
    blocks, its repeated paths once, across blocks too."""
    monkeypatch.setattr(listing_mod, "LIST_ROWS", 4)
    monkeypatch.setattr(listing_mod, "LIST_GROUP", 2)
    monkeypatch.setattr(listing_mod, "CSV_BLOCK", 64)
    src = tmp_path / "src"
    names = [f"d{i % 3}/{i:02d}.png" for i in range(11)] + ["top.jpg", "_skip/x.png", ".h/y.png", "d1/.z.png"]
    for n in names:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(b"x")
    (src / "d0" / "up").symlink_to(src, target_is_directory=True)  # a loop: entered once, at src itself
    (src / "d2" / "also-d1").symlink_to(src / "d1", target_is_directory=True)  # d1 again: not entered twice
    listing = streamed(str(src), str(tmp_path / "a"))
    want = ["top.jpg", *sorted(n for n in names[:11] if n.startswith("d0")),
            *sorted(n for n in names[:11] if n.startswith("d1")), *sorted(n for n in names[:11] if n.startswith("d2"))]
    assert [r.path for r in read_listing(listing)] == want and listing.rows == 12
    assert sorted(os.listdir(tmp_path / "a")) == ["list-00000.parquet", "list-00001.parquet", "list-00002.parquet",
                                                 "listing.json"]
    for lo, hi in ((0, 12), (3, 9), (4, 8), (5, 6), (11, 12)):
        assert listing_mod.listing_rows(listing.dest, lo, hi).column("path").to_pylist() == want[lo:hi]

    rows = [f"{i % 7}.png" for i in range(30)]  # seven paths, each named again in later blocks
    (tmp_path / "list.csv").write_bytes(("\ufeffPath ,note\n" + "".join(f"{r},n{i}\n" for i, r in enumerate(rows))
                                         + " , \n").encode())
    csv_listing = streamed(str(tmp_path / "list.csv"), str(tmp_path / "b"))
    assert [r.path for r in read_listing(csv_listing)] == [f"{i}.png" for i in range(7)]
    assert read_listing(csv_listing)[0].uri == str(tmp_path / "0.png")
    (tmp_path / "gap.csv").write_text("path,x\na.png,1\n,2\n")
    with pytest.raises(InputError, match="line 3 has no path"):
        streamed(str(tmp_path / "gap.csv"))


def test_streamed_s3_listing_is_in_the_order_of_a_local_folder(s3_bucket, monkeypatch, tmp_path):
    """A prefix walked one folder level at a time (ingest's ``sources.walk_files``) comes in the order a local
    folder with the same files has: a folder's files sorted, then its subfolders, across several listing parts."""
    monkeypatch.setattr(listing_mod, "LIST_ROWS", 3)
    fs, _ = rio.filesystem(s3_bucket)
    keys = ["a.png", "a/x.png", "a0.png", "a/b/c.png", "a-b.png", "b/.hid/z.png", "b/1.png", "b/notes.md", "c.png"]
    for key in keys:
        fs.pipe(f"{s3_bucket}/in/{key}".removeprefix("s3://"), b"x")
    listing = streamed(f"{s3_bucket}/in")
    want = ["a-b.png", "a.png", "a0.png", "c.png", "a/x.png", "a/b/c.png", "b/1.png"]
    assert [r.path for r in read_listing(listing)] == want and listing.ignored == 1
    for key in keys:
        (tmp_path / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / key).write_bytes(b"x")
    assert [r.path for r in read_listing(streamed(str(tmp_path / "in"), str(tmp_path / "list")))] == want


def test_copies_across_chunks_groups_and_buckets_are_stored_once(tmp_path, monkeypatch):
    """Many chunks in several staging tasks and dedup buckets: every stored id unique, each in the chunk of its
    first path, and each record names the chunk that stores its dropped copies."""
    monkeypatch.setattr(staging, "GROUP_ROWS", 8)
    monkeypatch.setattr(staging, "BUCKET_ROWS", 10)
    src = tmp_path / "src"
    src.mkdir()
    contents = [png(i % 23) for i in range(60)]  # 23 distinct images, most named two or three times
    for i, data in enumerate(contents):
        (src / f"{i:03d}.png").write_bytes(data)
    (src / "060.png").write_bytes(b"broken")
    listing = streamed(str(src), str(tmp_path / "inputs"))
    staged = stage_listing(listing, progress=False)
    assert staged.size == 4 and staged.chunks == 16 and len(staged.groups) == 8
    stored = [i for u in staged.shard_uris for i in shards.read_shard(u, ["id"]).column("id").to_pylist()]
    assert len(stored) == len(set(stored)) == 23 and staged.copies == 60 - 23
    first_chunk = {}
    for row_no, data in enumerate(contents):
        first_chunk.setdefault(shards.image_id(data), row_no // 4)
    for c in range(staged.chunks):
        r = read_record(staged.dest, c)
        assert all(first_chunk[i] == o != c for i, o in r["owners"].items())
        kept = shards.read_shard(rio.join(staged.dest, r["shard"]), ["id"]).column("id").to_pylist() if r["shard"] else []
        assert kept == [i for i in dict.fromkeys(x for x in r["ids"] if x) if first_chunk[i] == c]
    assert index_of(staged)[-1] == {"path": "060.png", "id": None, "reason": index_of(staged)[-1]["reason"]}
    assert pa.array(staged.part_of()).to_pylist().count(-1) == staged.chunk_rows.count(0)
