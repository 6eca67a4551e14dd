"""Decode once: the torch loader keeps each image's pixels after its first decode and augments from them.

A training run reads every image once per epoch (BYOL: 50-100 epochs; a fine-tuning round: as many passes as
its steps make). Decoding a JPEG/PNG again each time costs more CPU than the augmentation at 64-128 px. The
loader therefore keeps, per rank, each row's decoded pixels as uint8 arrays in a ``DecodedCache`` (in the
loader's own process, up to ``data.decode_cache_mb``; rows past the budget are decoded every time, and the
log says so once) and ships them to its decode workers with the batch instead of the encoded bytes.

What is kept is ``fit``'s output, which is also what the transforms see on the first pass, so a cached and an
uncached epoch draw from the same images:
- training views (``byol``, ``train``): the image with its shorter side brought down to ``CACHE_SCALE`` x the
  training size (never up): a random resized crop of at least ``1 / CACHE_SCALE**2`` of the area still
  samples full detail; a greyscale image keeps one channel (a third of the memory);
- ``eval``: the image resized to ``size x size`` exactly as ``augment.eval_transform`` resizes it (PIL,
  bilinear, antialiased, uint8), so cached evaluation is bit-identical to uncached.

The DALI backend decodes in its own pipeline and keeps nothing: see ``docs/architecture.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CACHE_SCALE = 2  # cached shorter side, in training sizes (64 px training -> 128 px kept)


def fit(im: Image.Image, mode: str, size: int) -> np.ndarray:
    """The pixels of a decoded image as they are kept: uint8 ``(H, W)`` for greyscale, else ``(H, W, 3)``."""
    if mode == "eval":
        im = im.resize((size, size), Image.BILINEAR)  # what T.Resize((size, size), antialias=True) does to PIL
    else:
        side = CACHE_SCALE * size
        w, h = im.size
        if min(w, h) > side:
            scale = side / min(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[2] == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def to_image(pixels: np.ndarray) -> Image.Image:
    """Kept pixels back to the RGB PIL image the transforms take (greyscale replicated to 3 channels)."""
    im = Image.fromarray(pixels)
    return im if im.mode == "RGB" else im.convert("RGB")


class DecodedCache:
    """Row key -> kept pixels, up to ``budget_bytes``; after that, rows are simply not kept."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.nbytes = 0
        self.full = False
        self._pixels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._pixels)

    def lookup(self, keys: Sequence[int]) -> list[np.ndarray | None]:
        """The kept pixels of each key, None where there are none."""
        return [self._pixels.get(int(k)) for k in keys]

    def add(self, key: int, pixels: np.ndarray) -> None:
        """Keep ``pixels`` for ``key`` while the budget lasts."""
        if self.full or int(key) in self._pixels:
            return
        if self.nbytes + pixels.nbytes > self.budget:
            self.full = True
            log.info("decoded-image cache full at %d images (%.0f MB): the rest are decoded every epoch; "
                     "raise data.decode_cache_mb to keep them", len(self._pixels), self.nbytes / 2**20)
            return
        self._pixels[int(key)] = pixels
        self.nbytes += pixels.nbytes
