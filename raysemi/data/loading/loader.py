"""``build_loader``: batches of augmented images from Parquet shards, DALI or torchvision behind one contract.

Batch contract (every tensor on ``device``; images float32 ``(B, 3, size, size)``, normalised):

- ``mode="byol"``:  ``{"view1", "view2"}``, the two asymmetric BYOL views of the same rows.
- ``mode="train"``: ``{"image", "label": int64 (B,), "weight": float32 (B,)}``; the weight comes from a
  ``weight`` column when the shard has one (pseudo-labelled training sets), else ones; null labels are -1.
- ``mode="pair"``:  ``{"weak", "strong", "label"}``: FixMatch's two views of the same rows (the weak one as
  ``augment.weak_transform``, the strong one as the fine-tuning augmentation) and the stored label (-1 = none;
  for monitoring only: consistency training must not learn from it).
- ``mode="eval"``:  ``{"image", "label": int64 (-1 = unlabelled), "id": list[str]}``.
- plus one list per name in ``columns_extra`` (e.g. ``"source"``), in every mode.

byol/train/pair (training): rank ``r`` reads only ``assign_shards(shard_uris, r, world_size)``, one shard at a
time with the next one read ahead in a background thread (S3 reads are slow). Each epoch the shard order
and the rows within each shard are reshuffled from ``(seed, epoch, rank)``, and a small carry-over buffer
mixes rows across shard boundaries. Every rank yields exactly ``len(loader)`` =
``steps_per_epoch(shard_rows, world_size, batch_size)`` full batches (the remainder is dropped, a different
one each epoch), or DDP would hang at the end of an epoch.

eval: every row of the shards (of this rank's shards when ``world_size > 1``) in stored order, the last
batch partial, deterministic.

Backends: ``"dali"`` (``raysemi.data.loading.dali``; decoding on the GPU when ``device`` is CUDA, DALI's
``device_id`` = ``device.index``), ``"torch"`` (the torchvision reference of ``raysemi.data.loading.augment`` in a
``torch.utils.data.DataLoader`` with ``num_threads`` worker processes), ``"auto"`` = DALI wherever it is
installed. ``loader.backend`` names the one in use. With ``decode_cache_mb`` > 0 the torch backend decodes each
row once and keeps its pixels for the later epochs (``raysemi.data.loading.decoded_cache``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from raysemi.core.config import AugmentConfig
from raysemi.data.loading.batches import (
    RawBatch,
    batch_seed,
    concat,
    read_ahead,
    read_rows,
    shard_row_counts,
    take,
)
from raysemi.data.loading.dali import DaliRunner, dali_available, require_dali
from raysemi.data.loading.decoded_cache import DecodedCache
from raysemi.data.loading.torch_backend import decoded_batches
from raysemi.data.shards import DatasetError, assign_shards, steps_per_epoch

log = logging.getLogger(__name__)

Mode = Literal["byol", "train", "pair", "eval"]
Backend = Literal["auto", "dali", "torch"]
MODES = ("byol", "train", "pair", "eval")
SHUFFLE_CARRY = 1024  # rows carried from one shard's shuffle into the next (cross-shard mixing)
CACHE_KEY = "_cache_key"  # column added to the rows when the decoded-image cache is on


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"dali"`` when it is installed, else ``"torch"``; ``"dali"`` without DALI raises."""
    if backend == "auto":
        return "dali" if dali_available() else "torch"
    if backend == "dali":
        require_dali()
        return "dali"
    if backend == "torch":
        return "torch"
    raise ValueError(f"unknown loader backend {backend!r} (auto, dali or torch)")


# ---------------------------------------------------------------- the loader


class Loader:
    """Iterable of batch dicts over ``shard_uris`` (see the module docstring); ``set_epoch`` before each epoch.

    ``batch_size`` is per rank. ``shard_rows`` (the manifest's row count of every shard in ``shard_uris``)
    lets every rank compute the same step count without opening other ranks' shards; without it the
    Parquet footers are read. ``device`` is where the batches land (DALI decodes on it when it is CUDA).
    """

    def __init__(
        self,
        shard_uris: Sequence[str],
        *,
        mode: Mode,
        size: int,
        batch_size: int,
        augment: AugmentConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        backend: Backend = "auto",
        device: torch.device | None = None,
        num_threads: int = 2,
        shard_rows: Sequence[int] | None = None,
        columns_extra: tuple[str, ...] = (),
        decode_cache_mb: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown loader mode {mode!r} ({', '.join(MODES)})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if shard_rows is not None and len(shard_rows) != len(shard_uris):
            raise ValueError(f"{len(shard_rows)} shard_rows given for {len(shard_uris)} shards")
        self.mode, self.size, self.batch_size, self.augment = mode, size, batch_size, augment
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_threads = num_threads
        self.columns_extra = tuple(columns_extra)
        self.backend = resolve_backend(backend)
        self.epoch = 0
        self.uris = list(shard_uris)
        self._all_rows = list(shard_rows) if shard_rows is not None else None
        if mode == "eval":
            self.my_uris = assign_shards(self.uris, rank, world_size) if world_size > 1 else list(self.uris)
            self._len: int | None = None  # computed on demand (footer reads) when no shard_rows
        else:
            self.my_uris = assign_shards(self.uris, rank, world_size)
            if self._all_rows is None:
                self._all_rows = shard_row_counts(self.uris)
            self._len = steps_per_epoch(self._all_rows, world_size, batch_size)
        self._columns = {"byol": (), "train": ("label", "weight"), "pair": ("label",), "eval": ("id", "label")}[mode]
        self._dali: DaliRunner | None = None
        keep = decode_cache_mb > 0 and self.backend == "torch"
        self.cache = DecodedCache(decode_cache_mb * 2**20) if keep else None
        self._shard_index = {u: i for i, u in enumerate(self.uris)}

    # -- the row stream, shared by both backends

    def __len__(self) -> int:
        if self._len is None:  # eval: this rank's rows in batches, the last one partial
            if self._all_rows is not None:
                mine = self._all_rows[self.rank :: self.world_size] if self.world_size > 1 else self._all_rows
            else:
                mine = shard_row_counts(self.my_uris)
            self._len = math.ceil(sum(mine) / self.batch_size)
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _read(self, uri: str) -> pa.Table:
        rows = read_rows(uri, self._columns, self.columns_extra)
        if self.cache is not None:  # the row's key in the cache: its shard and its place in it
            key = (np.int64(self._shard_index[uri]) << 32) + np.arange(rows.num_rows, dtype=np.int64)
            rows = rows.append_column(CACHE_KEY, pa.array(key))
        return rows

    def _raw_batches(self, epoch: int) -> Iterator[RawBatch]:
        if self.mode == "eval":
            yield from self._eval_batches()
        else:
            yield from self._train_batches(epoch)

    def _eval_batches(self) -> Iterator[RawBatch]:
        B, pending, step = self.batch_size, None, 0
        for rows in read_ahead(self.my_uris, self._read):
            pending = concat(pending, rows)
            full = pending.num_rows // B * B
            for start in range(0, full, B):
                yield RawBatch(take(pending, np.arange(start, start + B)), batch_seed(self.seed, self.rank, 0, step))
                step += 1
            pending = pending.slice(full)
        if pending is not None and pending.num_rows:
            yield RawBatch(take(pending, np.arange(pending.num_rows)), batch_seed(self.seed, self.rank, 0, step))

    def _train_batches(self, epoch: int) -> Iterator[RawBatch]:
        B, steps = self.batch_size, len(self)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        order = [self.my_uris[i] for i in rng.permutation(len(self.my_uris))]
        carry: pa.Table | None = None  # shuffled rows held back to mix with the next shard
        pending: pa.Table | None = None  # shuffled rows not yet batched
        step = 0
        shards = read_ahead(order, self._read)
        try:
            for i, rows in enumerate(shards):
                pool = concat(carry, rows)
                n = pool.num_rows
                perm = rng.permutation(n)
                keep = 0 if i == len(order) - 1 else min(SHUFFLE_CARRY, n)
                carry = take(pool, perm[n - keep :])
                pending = concat(pending, take(pool, perm[: n - keep]))
                full = pending.num_rows // B * B
                for start in range(0, full, B):
                    raw = take(pending, np.arange(start, start + B))
                    yield RawBatch(raw, batch_seed(self.seed, self.rank, epoch, step))
                    step += 1
                    if step == steps:
                        return
                pending = pending.slice(full)
        finally:
            shards.close()
        raise DatasetError(
            f"rank {self.rank} made {step} of {steps} batches: its shards hold fewer rows than shard_rows says"
        )

    # -- the backends

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self._decoded(self._raw_batches(self.epoch))

    def stream(self, start_step: int, stop_step: int) -> Iterator[dict[str, Any]]:
        """Training batches for the global steps ``[start_step, stop_step)``, epoch after epoch.

        Step ``s`` is batch ``s % len(self)`` of epoch ``s // len(self)``, exactly the batch that iterating
        epoch by epoch gives, so a run resumed at a step sees the same data. Unlike one ``iter()`` per
        epoch, the decoders (DataLoader workers or the DALI pipeline) start once for the whole range: with
        a small training set an epoch is a few steps, and a start-up per epoch would dominate them."""
        if self.mode == "eval":
            raise ValueError("stream() is for training loaders; iterate an eval loader once")
        per_epoch = len(self)
        if per_epoch == 0:
            raise DatasetError("the training set is smaller than one batch per rank")

        def raw_batches() -> Iterator[RawBatch]:
            step = start_step
            while step < stop_step:
                epoch, offset = divmod(step, per_epoch)
                batches = self._train_batches(epoch)
                try:
                    for i, raw in enumerate(batches):
                        if i < offset:
                            continue  # undecoded rows: skipping them costs a read, not a decode
                        if step >= stop_step:
                            return
                        yield raw
                        step += 1
                finally:
                    batches.close()

        yield from self._decoded(raw_batches())

    # -- the backends

    def _decoded(self, raws: Iterator[RawBatch]) -> Iterator[dict[str, Any]]:
        if self.backend == "dali":
            yield from self._iter_dali(raws)
        else:
            yield from self._iter_torch(raws)

    def _iter_dali(self, raws: Iterator[RawBatch]) -> Iterator[dict[str, Any]]:
        if self._dali is None:
            self._dali = DaliRunner(
                mode=self.mode, size=self.size, augment=self.augment, batch_size=self.batch_size,
                num_threads=self.num_threads, seed=batch_seed(self.seed, self.rank) % (2**31 - 1),
                device=self.device,
            )
        feed = (([np.frombuffer(b, dtype=np.uint8) for b in raw.images()], raw.side()) for raw in raws)
        for outs, side in self._dali.run(feed):
            yield self._batch(outs, side)

    def _iter_torch(self, raws: Iterator[RawBatch]) -> Iterator[dict[str, Any]]:
        cache = self.cache
        if cache is not None:
            raws = self._with_pixels(raws, cache)
        for outs, side, fresh in decoded_batches(raws, self.mode, self.size, self.augment, self.num_threads,
                                                 self.device, keep=cache is not None):
            if fresh:
                keys = side.rows.column(CACHE_KEY)
                for i, pixels in fresh:
                    cache.add(keys[i].as_py(), pixels)
            yield self._batch(outs, side)

    @staticmethod
    def _with_pixels(raws: Iterator[RawBatch], cache: DecodedCache) -> Iterator[RawBatch]:
        """Each batch with the kept pixels of its rows; without its encoded bytes when every row has them."""
        for raw in raws:
            pixels = cache.lookup(raw.rows.column(CACHE_KEY).to_numpy())
            rows = raw.rows.drop_columns(["image"]) if all(p is not None for p in pixels) else raw.rows
            yield RawBatch(rows, raw.seed, pixels)

    def _batch(self, outs: tuple[torch.Tensor, ...], side: RawBatch) -> dict[str, Any]:
        rows = side.rows

        def tensor(name: str) -> torch.Tensor:
            # a copy: Arrow buffers are read-only, and torch warns on a tensor over read-only memory
            return torch.from_numpy(rows.column(name).to_numpy().copy()).to(self.device, non_blocking=True)

        if self.mode == "byol":
            batch: dict[str, Any] = {"view1": outs[0], "view2": outs[1]}
        elif self.mode == "train":
            batch = {"image": outs[0], "label": tensor("label"), "weight": tensor("weight")}
        elif self.mode == "pair":
            batch = {"weak": outs[0], "strong": outs[1], "label": tensor("label")}
        else:
            batch = {"image": outs[0], "label": tensor("label"), "id": rows.column("id").to_pylist()}
        for k in self.columns_extra:
            batch[k] = rows.column(k).to_pylist()
        return batch


build_loader = Loader  # the name the stages use: one constructor, one set of parameters
