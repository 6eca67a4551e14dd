"""``build_loader``: batches of augmented images from Parquet shards, DALI or torchvision behind one contract.

Batch contract (every tensor on ``device``; images float32 ``(B, 3, size, size)``, normalised):

- ``mode="byol"``:  ``{"view1", "view2"}``, the two asymmetric BYOL views of the same rows.
- ``mode="train"``: ``{"image", "label": int64 (B,), "weight": float32 (B,)}``; the weight comes from a
  ``weight`` column when the shard has one (pseudo-labelled training sets), else ones; null labels are -1.
- ``mode="eval"``:  ``{"image", "label": int64 (-1 = unlabelled), "id": list[str]}``.
- plus one list per name in ``columns_extra`` (e.g. ``"source"``), in every mode.

byol/train (training): rank ``r`` reads only ``assign_shards(shard_uris, r, world_size)``, one shard at a
time with the next one read ahead in a background thread (S3 reads are slow). Each epoch the shard order
and the rows within each shard are reshuffled from ``(seed, epoch, rank)``, and a small carry-over buffer
mixes rows across shard boundaries. Every rank yields exactly ``len(loader)`` =
``steps_per_epoch(shard_rows, world_size, batch_size)`` full batches (the remainder is dropped, a different
one each epoch), or DDP would hang at the end of an epoch.

eval: every row of the shards (of this rank's shards when ``world_size > 1``) in stored order, the last
batch partial, deterministic.

Backends: ``"dali"`` (``raysemi.data.dali``; decoding on the GPU when ``device`` is CUDA, DALI's
``device_id`` = ``device.index``), ``"torch"`` (the torchvision reference of ``raysemi.data.augment`` in a
``torch.utils.data.DataLoader`` with ``num_threads`` worker processes), ``"auto"`` = DALI wherever it is
installed. ``loader.backend`` names the one in use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raysemi.config import AugmentConfig
from raysemi.data import augment as aug
from raysemi.data.dali import DaliRunner, dali_available, require_dali
from raysemi.data.shards import DatasetError, assign_shards, steps_per_epoch
from raysemi.io import filesystem, parquet_rows

log = logging.getLogger(__name__)

Mode = Literal["byol", "train", "eval"]
Backend = Literal["auto", "dali", "torch"]
MODES = ("byol", "train", "eval")
SHUFFLE_CARRY = 1024  # rows carried from one shard's shuffle into the next (cross-shard mixing)


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


# ---------------------------------------------------------------- rows


@dataclass
class Rows:
    """Rows of one or more shards, as Python/numpy columns (images stay encoded)."""

    images: list[bytes]
    labels: np.ndarray  # int64, -1 = none
    weights: np.ndarray  # float32
    ids: list[str] | None = None
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: Sequence[int] | np.ndarray) -> Rows:
        idx = np.asarray(idx, dtype=np.int64)
        return Rows(
            images=[self.images[i] for i in idx],
            labels=self.labels[idx],
            weights=self.weights[idx],
            ids=None if self.ids is None else [self.ids[i] for i in idx],
            extra={k: [v[i] for i in idx] for k, v in self.extra.items()},
        )

    def slice(self, start: int, stop: int) -> Rows:
        return Rows(
            images=self.images[start:stop],
            labels=self.labels[start:stop],
            weights=self.weights[start:stop],
            ids=None if self.ids is None else self.ids[start:stop],
            extra={k: v[start:stop] for k, v in self.extra.items()},
        )

    @staticmethod
    def concat(a: Rows | None, b: Rows) -> Rows:
        if a is None or len(a) == 0:
            return b
        return Rows(
            images=a.images + b.images,
            labels=np.concatenate([a.labels, b.labels]),
            weights=np.concatenate([a.weights, b.weights]),
            ids=None if a.ids is None or b.ids is None else a.ids + b.ids,
            extra={k: a.extra[k] + b.extra[k] for k in a.extra},
        )


@dataclass
class RawBatch:
    """One batch before decoding: what the loader feeds to a backend."""

    rows: Rows
    seed: int  # seeds the torch backend's random transforms of this batch (reproducible per batch)

    def side(self) -> RawBatch:
        """The same batch without its encoded images (what travels beside the decoded tensors)."""
        r = self.rows
        return RawBatch(Rows([], r.labels, r.weights, r.ids, r.extra), self.seed)


def read_rows(uri: str, columns: Sequence[str], extra: Sequence[str] = ()) -> Rows:
    """Read one shard's ``image`` plus those of ``columns`` it has (``label``, ``weight``, ``id``) and the
    required ``extra`` columns."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            need = ["image", *extra] + (["id"] if "id" in columns else [])
            missing = [c for c in need if c not in names]
            if missing:
                raise DatasetError(f"shard {uri} has no column {', '.join(missing)}")
            wanted = list(dict.fromkeys(["image", *[c for c in columns if c in names], *extra]))
            table = pf.read(columns=wanted)
    except FileNotFoundError:
        raise DatasetError(f"shard {uri} is missing") from None
    n = table.num_rows
    labels = (
        pc.fill_null(table.column("label"), -1).to_numpy().astype(np.int64)
        if "label" in table.column_names
        else np.full(n, -1, dtype=np.int64)
    )
    weights = (
        pc.fill_null(table.column("weight").cast(pa.float32()), 1.0).to_numpy().astype(np.float32)
        if "weight" in table.column_names
        else np.ones(n, dtype=np.float32)
    )
    ids = table.column("id").to_pylist() if "id" in columns else None
    return Rows(
        images=table.column("image").to_pylist(),
        labels=labels,
        weights=weights,
        ids=ids,
        extra={k: table.column(k).to_pylist() for k in extra},
    )


def shard_row_counts(uris: Sequence[str]) -> list[int]:
    """Row counts from the Parquet footers (when the manifest's counts are not at hand)."""
    counts = []
    for uri in uris:
        try:
            counts.append(parquet_rows(uri))
        except FileNotFoundError:
            raise DatasetError(f"shard {uri} is missing") from None
    return counts


def read_ahead(uris: Sequence[str], read) -> Iterator[Any]:
    """``read(uri)`` for each uri in order, the next one read in a background thread meanwhile."""
    if not uris:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysemi-shard")
    try:
        future = pool.submit(read, uris[0])
        for i in range(len(uris)):
            current = future.result()
            if i + 1 < len(uris):
                future = pool.submit(read, uris[i + 1])
            yield current
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _batch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ---------------------------------------------------------------- the torch backend


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
            for data in raw.rows.images:
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


# ---------------------------------------------------------------- the loader


class Loader:
    """Iterable of batch dicts (see the module docstring); ``set_epoch`` before each epoch."""

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
        self._columns = {"byol": (), "train": ("label", "weight"), "eval": ("id", "label")}[mode]
        self._dali: DaliRunner | None = None

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

    def _read(self, uri: str) -> Rows:
        return read_rows(uri, self._columns, self.columns_extra)

    def _raw_batches(self, epoch: int) -> Iterator[RawBatch]:
        if self.mode == "eval":
            yield from self._eval_batches()
        else:
            yield from self._train_batches(epoch)

    def _eval_batches(self) -> Iterator[RawBatch]:
        B, pending, step = self.batch_size, None, 0
        for rows in read_ahead(self.my_uris, self._read):
            pending = Rows.concat(pending, rows)
            full = len(pending) // B * B
            for start in range(0, full, B):
                yield RawBatch(pending.slice(start, start + B), _batch_seed(self.seed, self.rank, 0, step))
                step += 1
            pending = pending.slice(full, len(pending))
        if pending is not None and len(pending):
            yield RawBatch(pending, _batch_seed(self.seed, self.rank, 0, step))

    def _train_batches(self, epoch: int) -> Iterator[RawBatch]:
        B, steps = self.batch_size, len(self)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        order = [self.my_uris[i] for i in rng.permutation(len(self.my_uris))]
        carry: Rows | None = None  # shuffled rows held back to mix with the next shard
        pending: Rows | None = None  # shuffled rows not yet batched
        step = 0
        shards = read_ahead(order, self._read)
        try:
            for i, rows in enumerate(shards):
                pool = Rows.concat(carry, rows)
                perm = rng.permutation(len(pool))
                keep = 0 if i == len(order) - 1 else min(SHUFFLE_CARRY, len(pool))
                carry = pool.take(perm[len(pool) - keep :])
                pending = Rows.concat(pending, pool.take(perm[: len(pool) - keep]))
                full = len(pending) // B * B
                for start in range(0, full, B):
                    yield RawBatch(pending.slice(start, start + B), _batch_seed(self.seed, self.rank, epoch, step))
                    step += 1
                    if step == steps:
                        return
                pending = pending.slice(full, len(pending))
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
                num_threads=self.num_threads, seed=_batch_seed(self.seed, self.rank) % (2**31 - 1),
                device=self.device,
            )
        feed = (([np.frombuffer(b, dtype=np.uint8) for b in raw.rows.images], raw.side()) for raw in raws)
        for outs, side in self._dali.run(feed):
            yield self._batch(outs, side)

    def _iter_torch(self, raws: Iterator[RawBatch]) -> Iterator[dict[str, Any]]:
        workers = max(0, self.num_threads)
        loader = torch.utils.data.DataLoader(
            _TorchTransformDataset(self.mode, self.size, self.augment),
            batch_size=None,
            sampler=_OnceSampler(raws),
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,  # persistent workers leak into later forks (torch warns at exit)
            prefetch_factor=2 if workers > 0 else None,
        )
        for outs, side in loader:
            yield self._batch(tuple(o.to(self.device, non_blocking=True) for o in outs), side)

    def _batch(self, outs: tuple[torch.Tensor, ...], side: RawBatch) -> dict[str, Any]:
        rows = side.rows
        if self.mode == "byol":
            batch: dict[str, Any] = {"view1": outs[0], "view2": outs[1]}
        elif self.mode == "train":
            batch = {
                "image": outs[0],
                "label": torch.from_numpy(rows.labels).to(self.device, non_blocking=True),
                "weight": torch.from_numpy(rows.weights).to(self.device, non_blocking=True),
            }
        else:
            batch = {
                "image": outs[0],
                "label": torch.from_numpy(rows.labels).to(self.device, non_blocking=True),
                "id": list(rows.ids or []),
            }
        for k in self.columns_extra:
            batch[k] = rows.extra[k]
        return batch


def build_loader(
    shard_uris: list[str],
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
    shard_rows: list[int] | None = None,
    columns_extra: tuple[str, ...] = (),
) -> Loader:
    """A :class:`Loader` over ``shard_uris`` (see the module docstring for the contract).

    ``batch_size`` is per rank. ``shard_rows`` (the manifest's row count of every shard in ``shard_uris``)
    lets every rank compute the same step count without opening other ranks' shards; without it the
    Parquet footers are read. ``device`` is where the batches land (DALI decodes on it when it is CUDA).
    """
    return Loader(
        shard_uris, mode=mode, size=size, batch_size=batch_size, augment=augment, rank=rank,
        world_size=world_size, seed=seed, backend=backend, device=device, num_threads=num_threads,
        shard_rows=shard_rows, columns_extra=columns_extra,
    )
