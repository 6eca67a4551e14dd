"""The torch backend of the loader: torchvision transforms (``raysemi.data.augment``) in DataLoader workers.

The main process reads and shuffles rows (``raysemi.data.batches``); the DataLoader's workers decode and
transform whole raw batches, so both backends share one row stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from raysemi.config import AugmentConfig
from raysemi.data import augment as aug
from raysemi.data.batches import RawBatch


def _identity(x):
    return x


class _TorchTransformDataset(torch.utils.data.Dataset):
    """Map-style dataset whose "index" is a whole :class:`RawBatch`: the DataLoader's workers decode and
    transform batches that the main process reads and shuffles (so both backends share one row stream)."""

    def __init__(self, mode: str, size: int, augment: AugmentConfig) -> None:
        self.mode, self.size, self.augment = mode, size, augment
        self._transforms = None

    def transforms(self):
        if self._transforms is None:
            if self.mode == "byol":
                self._transforms = aug.byol_views(self.augment, self.size)
            elif self.mode == "train":
                self._transforms = (aug.train_transform(self.size, self.augment),)
            else:
                self._transforms = (aug.eval_transform(self.size, self.augment),)
        return self._transforms

    def __getitem__(self, raw: RawBatch):
        transforms = self.transforms()
        outs: list[list[torch.Tensor]] = [[] for _ in transforms]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(raw.seed)
            for data in raw.images():
                im = aug.decode_rgb(data)
                for out, t in zip(outs, transforms):
                    out.append(t(im))
        return tuple(torch.stack(o) for o in outs), raw.side()

    def __len__(self) -> int:  # unused: the sampler decides
        return 0


class _OnceSampler:
    """A DataLoader sampler over one iterator of raw batches (the main process reads and shuffles rows)."""

    def __init__(self, raws: Iterator[RawBatch]) -> None:
        self.raws = raws

    def __iter__(self):
        return self.raws


def decoded_batches(
    raws: Iterator[RawBatch], mode: str, size: int, augment: AugmentConfig, num_threads: int, device: torch.device
) -> Iterator[tuple[tuple[torch.Tensor, ...], RawBatch]]:
    """``(tensors on device, side)`` per raw batch, decoded by ``num_threads`` worker processes."""
    workers = max(0, num_threads)
    loader = torch.utils.data.DataLoader(
        _TorchTransformDataset(mode, size, augment),
        batch_size=None,
        sampler=_OnceSampler(raws),
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # persistent workers leak into later forks (torch warns at exit)
        prefetch_factor=2 if workers > 0 else None,
    )
    for outs, side in loader:
        yield tuple(o.to(device, non_blocking=True) for o in outs), side
