"""What ``raysemi predict`` reads: listing SOURCE (folder, CSV, dataset, S3 prefix) and staging it resumably."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raysemi import io as rio
from raysemi.data import image_staging, shards
from raysemi.data.image_inputs import InputError, list_source
from raysemi.data.image_staging import chunk_uri, rows_per_shard, stage_images


def png(seed: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_folder_listing_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "2.PNG").write_bytes(png(2))
    (tmp_path / "1.jpg").write_bytes(b"whatever")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden" / "3.png").write_bytes(png(3))
    listing = list_source(str(tmp_path))
    assert listing.kind == "folder" and listing.ignored == 1
    assert [r.path for r in listing.images] == ["1.jpg", "b/2.PNG"]
    assert listing.images[1].uri == str(tmp_path / "b" / "2.PNG")
    assert list_source(str(tmp_path / "1.jpg")).images[0].path == "1.jpg"
    assert list_source(str(tmp_path)).fingerprint() == listing.fingerprint()
    (tmp_path / "4.png").write_bytes(png(4))
    assert list_source(str(tmp_path)).fingerprint() != listing.fingerprint()


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
    listing = list_source(str(img / "list.csv"))
    assert listing.kind == "csv" and len(listing.images) == 8  # 1.png named twice: once
    assert rows_per_shard(8) == 1 and rows_per_shard(10_000) == image_staging.MAX_ROWS

    dest = str(tmp_path / "inputs")
    staged = stage_images(listing.images, dest, progress=False)
    index = staged.index.to_pylist()
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

    # A rerun reuses every committed chunk; a chunk whose record is lost is staged again, the same.
    rio.filesystem(dest)[0].rm(chunk_uri(dest, 2))
    written = []
    real = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", lambda *a, **k: written.append(a[1]) or real(*a, **k))
    again = stage_images(listing.images, dest, progress=False)
    assert (again.reused, written) == (7, [])  # chunk 2 (the copy) holds no row: nothing to write
    assert again.index.equals(staged.index) and again.shard_uris == staged.shard_uris


def test_s3_prefix_listing(s3_bucket):
    fs, _ = rio.filesystem(s3_bucket)
    for key in ("new/a.png", "new/sub/b.jpg", "new/notes.txt", "newer/c.png", "new/.trash/d.png"):
        fs.pipe(f"{s3_bucket}/{key}".removeprefix("s3://"), png(1))
    listing = list_source(f"{s3_bucket}/new")
    assert listing.kind == "prefix" and listing.ignored == 1
    assert [(r.path, r.uri) for r in listing.images] == [
        ("a.png", f"{s3_bucket}/new/a.png"), ("sub/b.jpg", f"{s3_bucket}/new/sub/b.jpg")]
    with pytest.raises(InputError, match="does not exist"):
        list_source(f"{s3_bucket}/nothing-here")
