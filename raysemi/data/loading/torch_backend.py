"""The torch backend of the loader: torchvision transforms (``raysemi.data.loading.augment``) in DataLoader workers.

The main process reads and shuffles rows (``raysemi.data.loading.batches``); the DataLoader's workers decode and
transform whole raw batches, so both backends share one row stream. With ``keep`` (the loader's decoded-image
cache, ``raysemi.data.loading.decoded_cache``) a row that comes with its pixels is not decoded, and the pixels of the
rows decoded now travel back with the batch for the loader to keep.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from raysemi.core.config import AugmentConfig
from raysemi.data.loading import augment as aug
from raysemi.data.loading.batches import RawBatch
from raysemi.data.loading.decoded_cache import fit, to_image


def _identity(x):
    return x


class _TorchTransformDataset(torch.utils.data.Dataset):
    """Map-style dataset whose "index" is a whole :class:`RawBatch`: the DataLoader's workers decode and
    transform batches that the main process reads and shuffles (so both backends share one row stream)."""

    def __init__(self, mode: str, size: int, augment: AugmentConfig, keep: bool = False) -> None:
        self.mode, self.size, self.augment, self.keep = mode, size, augment, keep
        self._transforms = None

    def transforms(self):
        if self._transforms is None:
            if self.mode == "byol":
                self._transforms = aug.byol_views(self.augment, self.size)
            elif self.mode == "train":
                self._transforms = (aug.train_transform(self.size, self.augment),)
            elif self.mode == "pair":
                self._transforms = (aug.weak_transform(self.size, self.augment),
                                    aug.train_transform(self.size, self.augment))
            else:
                self._transforms = (aug.eval_transform(self.size, self.augment),)
        return self._transforms

    def image(self, raw: RawBatch, i: int, fresh: list[tuple[int, np.ndarray]]):
        pixels = raw.pixels[i] if raw.pixels is not None else None
        if pixels is None:
            im = aug.decode_rgb(raw.rows.column("image")[i].as_py())
            if not self.keep:
                return im
            pixels = fit(im, self.mode, self.size)
            fresh.append((i, pixels))
        return to_image(pixels)

    def __getitem__(self, raw: RawBatch):
        transforms = self.transforms()
        outs: list[list[torch.Tensor]] = [[] for _ in transforms]
        fresh: list[tuple[int, np.ndarray]] = []  # (row, pixels) decoded now, for the loader to keep
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(raw.seed)
            for i in range(raw.rows.num_rows):
                im = self.image(raw, i, fresh)
                for out, t in zip(outs, transforms):
                    out.append(t(im))
        return tuple(torch.stack(o) for o in outs), raw.side(), fresh

    def __len__(self) -> int:  # unused: the sampler decides
        return 0


class _OnceSampler:
    """A DataLoader sampler over one iterator of raw batches (the main process reads and shuffles rows)."""

    def __init__(self, raws: Iterator[RawBatch]) -> None:
        self.raws = raws

    def __iter__(self):
        return self.raws


def decoded_batches(
    raws: Iterator[RawBatch], mode: str, size: int, augment: AugmentConfig, num_threads: int, device: torch.device,
    keep: bool = False,
) -> Iterator[tuple[tuple[torch.Tensor, ...], RawBatch, list[tuple[int, np.ndarray]]]]:
    """``(tensors on device, side, fresh)`` per raw batch, decoded by ``num_threads`` worker processes;
    ``fresh`` holds the kept pixels of the rows decoded for this batch (with ``keep``; else empty)."""
    workers = max(0, num_threads)
    loader = torch.utils.data.DataLoader(
        _TorchTransformDataset(mode, size, augment, keep),
        batch_size=None,
        sampler=_OnceSampler(raws),
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # persistent workers leak into later forks (torch warns at exit)
        prefetch_factor=2 if workers > 0 else None,
    )
    for outs, side, fresh in loader:
        yield tuple(o.to(device, non_blocking=True) for o in outs), side, fresh
