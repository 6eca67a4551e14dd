"""The corruption corpus: every bad input is quarantined with a reason or normalised; nothing crashes."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysemi.data import shards
from raysemi.data.ingest.run import ingest
from raysemi.data.ingest.validate import check_image, encode_array


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + _chunk(b"IEND", b"")
    )


RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (48, 40), dtype=np.uint8)
RGB = RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8)
GOOD_PNG = _save(Image.fromarray(RGB), "PNG")
GOOD_JPEG = _save(Image.fromarray(GREY), "JPEG", quality=90)
WIDE16 = (np.arange(48 * 40).reshape(48, 40) * 20 + 1000).astype(np.uint16)

# name -> (bytes, expected reason or None, expected conversion or None, stored mode or None)
CORPUS = {
    "good.png": (GOOD_PNG, None, None, "RGB"),
    "good.jpg": (GOOD_JPEG, None, None, "L"),
    "truncated.jpg": (GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated", None, None),
    "truncated.png": (GOOD_PNG[: len(GOOD_PNG) // 2], "truncated", None, None),
    "random.jpg": (RNG.bytes(4096), "not an image", None, None),
    "zero.png": (b"", "zero bytes", None, None),
    "text.png": (b"this is a text file, not a PNG\n" * 20, "not an image", None, None),
    "bomb.png": (bomb_png(), "over pixel limit (100000 x 100000)", None, None),
    "sixteen.png": (_save(Image.fromarray(WIDE16), "PNG"), None, "16-bit grey PNG -> 8-bit L PNG", "L"),
    "cmyk.jpg": (_save(Image.fromarray(RGB).convert("CMYK"), "JPEG"), None, "CMYK JPEG -> RGB PNG", "RGB"),
    "rgba.png": (
        _save(Image.fromarray(RGB).convert("RGBA"), "PNG"),
        None,
        "8-bit RGBA PNG -> 8-bit RGB PNG",
        "RGB",
    ),
    "palette.png": (
        _save(Image.fromarray(GREY).convert("P"), "PNG"),
        None,
        "8-bit palette PNG -> 8-bit L PNG",
        "L",
    ),
    "scan.tif": (_save(Image.fromarray(RGB), "TIFF"), None, "TIFF -> RGB PNG", "RGB"),
    "lab.tif": (_save(Image.fromarray(RGB).convert("LAB"), "TIFF"), "unsupported mode LAB", None, None),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_check_image(name):
    data, reason, conversion, mode = CORPUS[name]
    out = check_image(data)
    assert out.reason == reason
    assert out.conversion == conversion
    if reason is None:
        assert out.mode == mode and out.size == (40, 48)
        im = Image.open(io.BytesIO(out.data))
        im.load()
        assert im.mode == mode and im.format in ("PNG", "JPEG")
        if conversion is None:
            assert out.data == data  # stored as-is


def test_sixteen_bit_is_stretched_to_full_range():
    out = check_image(CORPUS["sixteen.png"][0])
    arr = np.asarray(Image.open(io.BytesIO(out.data)))
    assert arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255
    assert np.all(np.diff(arr.ravel().astype(int)) >= 0)  # monotone ramp stays monotone


def test_pixel_limit_is_checked_before_decoding():
    t = time.perf_counter()
    assert check_image(bomb_png(60_000, 60_000)).reason == "over pixel limit (60000 x 60000)"
    assert time.perf_counter() - t < 1.0
    assert check_image(GOOD_PNG, max_pixels=40 * 48 - 1).reason == "over pixel limit (40 x 48)"
    assert check_image(GOOD_PNG, max_pixels=40 * 48).ok


def test_damaged_png_tail_is_refused():
    # Pillow's load() tolerates a missing IEND/CRC; libpng (DALI) does not: verify() catches it.
    assert not check_image(GOOD_PNG[:-5]).ok
    damaged = bytearray(GOOD_PNG)
    damaged[len(damaged) // 2] ^= 0xFF
    assert check_image(bytes(damaged)).reason.startswith(("corrupt", "truncated"))


def test_encode_array():
    for arr, mode in ((GREY, "L"), (RGB, "RGB"), (GREY[..., None], "L"), (np.dstack([RGB, GREY]), "RGB")):
        im = Image.open(io.BytesIO(encode_array(arr)))
        assert im.mode == mode and im.size == (40, 48)
    with pytest.raises(ValueError, match="uint8"):
        encode_array(GREY.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_array(RGB[..., :2])


def test_corpus_through_ingest(tmp_path):
    src = tmp_path / "src"
    for k, (name, (data, *_)) in enumerate(sorted(CORPUS.items())):
        folder = src / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    home = next(src.glob("*/good.png")).parent
    other = src / ("b" if home.name == "a" else "a")
    (home / "copy-of-good.png").write_bytes(GOOD_PNG)  # same class as good.png: a plain duplicate
    (other / "copy-of-good.png").write_bytes(GOOD_PNG)  # another class: quarantined as a conflict
    m = ingest(str(src), str(tmp_path / "ds"), progress=False, min_shards=1)

    expected_bad = {n: r for n, (_, r, _, _) in CORPUS.items() if r}
    quarantine = shards.read_quarantine(str(tmp_path / "ds")).to_pylist()
    assert m.quarantined_total == len(quarantine)
    reasons = {q["source"]: q["reason"] for q in quarantine}
    conflict = reasons.pop(f"{other.name}/copy-of-good.png")
    assert conflict.startswith("duplicate with conflicting label")
    assert {Path(k).name: r for k, r in reasons.items()} == expected_bad
    stored = sum(s.rows for s in m.splits.values())
    assert stored + len(quarantine) + m.duplicates == len(CORPUS) + 2 == m.extra["inputs"]
    assert m.duplicates == 1 and stored == len(CORPUS) - len(expected_bad)
    assert m.extra["converted"] == {
        "16-bit grey PNG -> 8-bit L PNG": 1,
        "8-bit RGBA PNG -> 8-bit RGB PNG": 1,
        "8-bit palette PNG -> 8-bit L PNG": 1,
        "CMYK JPEG -> RGB PNG": 1,
        "TIFF -> RGB PNG": 1,
    }
    for split in ("train", "val", "test"):
        for r in shards.read_split(str(tmp_path / "ds"), split).to_pylist():
            im = Image.open(io.BytesIO(r["image"]))
            im.load()
            assert im.mode in ("L", "RGB") and im.format in ("PNG", "JPEG")
            original = (src / r["source"]).read_bytes()
            assert r["id"] == shards.image_id(original)  # the id of the original bytes, also when converted


def test_all_bad_is_an_error(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "zero.png").write_bytes(b"")
    with pytest.raises(shards.DatasetError, match="no valid images"):
        ingest(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()  # the folder the destination check made is gone again
