"""Image validation at ingest: decode every image once on the CPU, quarantine what fails, normalise the rest.

DALI aborts a whole pipeline on one undecodable image and cannot skip it, so nothing reaches a shard that
its ``decoders.image`` might choke on. What is stored as-is: 8-bit greyscale or RGB JPEG, 8-bit greyscale or
RGB PNG. What is decodable but awkward is re-encoded losslessly as PNG: 16-bit PNG (linearly stretched from
the image's own min..max to 0..255), CMYK JPEG (-> RGB), palette / grey+alpha / RGBA / bilevel (-> L or RGB,
alpha dropped), and every other format Pillow reads (TIFF, BMP, GIF, WebP, ...). What fails goes to the
quarantine list with a short reason: "zero bytes", "not an image", "truncated", "over pixel limit (W x H)",
"unsupported mode X", "corrupt: <decoder message>".

The pixel limit is checked on the header's width x height before anything is decoded, so a decompression
bomb costs a header parse.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000

# Modes we can turn into 8-bit L or RGB; anything else is quarantined as "unsupported mode".
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "P", "PA"}
_PNG_COLOUR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


@dataclass(frozen=True)
class Checked:
    """The outcome for one input: ``reason`` set (quarantine) or ``data`` set (what to store)."""

    data: bytes | None = None
    reason: str | None = None
    conversion: str | None = None  # e.g. "16-bit PNG -> 8-bit PNG"; None when stored as-is
    mode: str | None = None  # mode of the stored image: "L" or "RGB"
    size: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _open_header(data: bytes) -> Image.Image:
    """``Image.open`` (header only). When Pillow's own bomb guard (2 x MAX_IMAGE_PIXELS) fires, open the
    header with the format plugin directly so the caller can still report W x H, or decode an image that
    a ``max_pixels`` above Pillow's default allows."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        Image.init()
        prefix = data[:16]
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            if accept is not None and not accept(prefix):
                continue
            try:
                return factory(io.BytesIO(data), None)
            except Exception:
                continue
        raise


def _reason_for(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "truncat" in msg.lower():
        return "truncated"
    return f"corrupt: {msg[:120]}"


def _png_header(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR."""
    return data[24], data[25]


def _encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _to_8bit(im: Image.Image) -> Image.Image:
    """Normalise any supported mode to 8-bit L or RGB."""
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if mode in ("1", "L", "LA", "La"):
        return im.convert("L")
    if mode in ("P", "PA"):
        rgb = im.convert("RGB")
        arr = np.asarray(rgb)
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            return rgb.convert("L")
        return rgb
    return im.convert("RGB")


def _describe(fmt: str, im: Image.Image, data: bytes) -> str:
    if fmt == "PNG":
        depth, ctype = _png_header(data)
        kind = _PNG_COLOUR_TYPES.get(ctype, f"colour type {ctype}")
        return f"{depth}-bit {kind} PNG"
    if fmt in ("JPEG", "MPO"):
        return f"{im.mode} JPEG"
    return fmt or "unknown format"


def check_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Checked:
    """Decode ``data`` fully once; return what to store (maybe re-encoded) or why it is quarantined."""
    if not data:
        return Checked(reason="zero bytes")
    try:
        im = _open_header(data)
    except UnidentifiedImageError:
        return Checked(reason="not an image")
    except Image.DecompressionBombError:
        return Checked(reason="over pixel limit")
    except Exception as err:  # a plugin that recognised the magic bytes but choked on the header
        return Checked(reason=_reason_for(err))
    with im:
        width, height = im.size
        if width * height > max_pixels:
            return Checked(reason=f"over pixel limit ({width} x {height})")
        if width < 1 or height < 1:
            return Checked(reason=f"corrupt: empty image ({width} x {height})")
        if im.mode not in _GREY_MODES | _COLOUR_MODES:
            return Checked(reason=f"unsupported mode {im.mode}")
        fmt = im.format or ""
        try:
            if fmt == "PNG":
                # load() tolerates a damaged tail (CRCs, IEND); libpng in DALI does not, so verify the chunks too.
                with _open_header(data) as again:
                    again.verify()
            im.load()
        except Exception as err:
            return Checked(reason=_reason_for(err))

        if fmt in ("JPEG", "MPO") and im.mode in ("L", "RGB"):
            return Checked(data=data, mode=im.mode, size=(width, height))
        if fmt == "PNG" and _png_header(data) in ((8, 0), (8, 2)):
            return Checked(data=data, mode=im.mode, size=(width, height))
        try:
            out = _to_8bit(im)
            encoded = _encode_png(out)
        except Exception as err:
            return Checked(reason=f"unsupported mode {im.mode} ({_reason_for(err)})")
        bits = "8-bit " if fmt == "PNG" else ""
        conversion = f"{_describe(fmt, im, data)} -> {bits}{out.mode} PNG"
        return Checked(data=encoded, conversion=conversion, mode=out.mode, size=(width, height))


def encode_array(arr: np.ndarray) -> bytes:
    """A uint8 HxW or HxWxC (C in 1, 3, 4) array as PNG bytes (8-bit L or RGB; alpha dropped)."""
    if arr.dtype != np.uint8:
        raise ValueError(f"array dtype {arr.dtype} is not uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"array shape {arr.shape} is not HxW or HxWxC with C in 1, 3, 4")
    return _encode_png(Image.fromarray(np.ascontiguousarray(arr)))
