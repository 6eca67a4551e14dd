"""build_loader: one batch contract for both backends, rank split, equal step counts, per-epoch reshuffle."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFilter

from raysemi.core import io as rio
from raysemi.core.config import AugmentConfig
from raysemi.data import shards
from raysemi.data.loading import augment as aug
from raysemi.data.loading.dali import dali_available
from raysemi.data.loading.loader import build_loader, resolve_backend
from raysemi.data.shards import DatasetError, steps_per_epoch
from raysemi.data.trainset import TRAINSET_SCHEMA

HAVE_DALI = dali_available()
BACKENDS = [
    "torch",
    pytest.param("dali", marks=[pytest.mark.dali, pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali absent")]),
]
SIZE = 24
CFG = AugmentConfig()
LO = min((0.0 - m) / s for m, s in zip(CFG.mean, CFG.std))  # normalised value of black
HI = max((1.0 - m) / s for m, s in zip(CFG.mean, CFG.std))  # ... and of white


# ---------------------------------------------------------------- helpers (also used by test_dali.py)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process torchvision transforms with one intra-op thread, as in DataLoader workers: on a busy
    2-core machine, 2 threads make each tiny conv2d (the blur) ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def smooth_image(rng: np.random.Generator, h: int = 40, w: int = 48, grey: bool = False) -> Image.Image:
    """A smooth random texture (so that resampling differences between libraries stay small)."""
    c = 1 if grey else 3
    a = (rng.random((h // 8 + 2, w // 8 + 2, c)) * 255).astype(np.uint8)
    im = Image.fromarray(a[..., 0] if grey else a).resize((w, h), Image.BICUBIC)
    return im.filter(ImageFilter.GaussianBlur(2))


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_images(n: int, seed: int = 0, h: int = 40, w: int = 48) -> list[bytes]:
    """Encoded images cycling through grey PNG, RGB JPEG, grey JPEG, RGB PNG."""
    rng = np.random.default_rng(seed)
    kinds = [(True, "PNG"), (False, "JPEG"), (True, "JPEG"), (False, "PNG")]
    return [encode(smooth_image(rng, h, w, grey), fmt) for grey, fmt in (kinds[i % 4] for i in range(n))]


def write_shards(root, rows: list[int], *, weights: bool = False, seed: int = 0) -> list[str]:
    """Shards of ``rows[i]`` generated images each; ids ``s<i>-<j>``, every 4th label null; with
    ``weights`` the fine-tuning trainset schema (``id, image, label, weight``, weight = j / 10)."""
    uris = []
    for s, n in enumerate(rows):
        images = make_images(n, seed=seed * 1000 + s)
        ids = [f"s{s}-{j}" for j in range(n)]
        labels = pa.array([None if j % 4 == 0 else j % 3 for j in range(n)], pa.int16())
        rel = f"train/part-{s:05d}.parquet"
        if weights:
            table = pa.table(
                [pa.array(ids), pa.array(images, pa.binary()), pa.array([j % 3 for j in range(n)], pa.int16()),
                 pa.array([j / 10 for j in range(n)], pa.float32())],
                schema=TRAINSET_SCHEMA,
            )
            rio.write_bytes_atomic(rio.join(str(root), rel), shards.table_bytes(table))
        else:
            table = pa.table(
                {"id": ids, "image": images, "label": labels, "group": [None] * n, "source": [f"{i}.png" for i in ids]}
            )
            shards.write_shard(str(root), rel, table)
        uris.append(rio.join(str(root), rel))
    return uris


def loader(uris, backend="torch", **kw):
    args = dict(mode="train", size=SIZE, batch_size=4, augment=CFG, backend=backend, num_threads=0)
    args.update(kw)
    if backend == "torch" and "num_threads" not in kw:
        args["num_threads"] = 0  # in-process: the row stream is what these tests are about
    return build_loader(list(uris), **args)


def epoch_ids(ld, epoch: int) -> list[str]:
    ld.set_epoch(epoch)
    return [i for b in ld for i in b["id"]]


# ---------------------------------------------------------------- the contract, both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_byol_contract(tmp_path, backend):
    uris = write_shards(tmp_path, [10, 7, 9])
    ld = loader(uris, backend, mode="byol", num_threads=2)
    assert ld.backend == backend
    assert len(ld) == steps_per_epoch([10, 7, 9], 1, 4) == 6
    for epoch in range(2):
        ld.set_epoch(epoch)
        batches = list(ld)
        assert len(batches) == len(ld)
        for b in batches:
            assert set(b) == {"view1", "view2"}
            for v in (b["view1"], b["view2"]):
                assert v.shape == (4, 3, SIZE, SIZE) and v.dtype == torch.float32 and v.device.type == "cpu"
                assert float(v.min()) >= LO - 1e-4 and float(v.max()) <= HI + 1e-4
            assert not torch.allclose(b["view1"], b["view2"], atol=1e-3)
    # normalised, not raw 0..1 or 0..255: over many random views the mean sits well inside the range
    assert LO < float(torch.cat([b["view1"] for b in batches]).mean()) < HI


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_contract_with_weights(tmp_path, backend):
    uris = write_shards(tmp_path, [6, 6], weights=True)
    ld = loader(uris, backend, batch_size=3, columns_extra=("id",))
    assert len(ld) == 4
    seen = {}
    for b in ld:
        assert b["image"].shape == (3, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["weight"].dtype == torch.float32
        for i, y, w in zip(b["id"], b["label"].tolist(), b["weight"].tolist()):
            seen[i] = (y, w)
    assert len(seen) == 12
    for i, (y, w) in seen.items():
        j = int(i.split("-")[1])
        assert y == j % 3 and w == pytest.approx(j / 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_contract(tmp_path, backend):
    """FixMatch's pool batches: a weak view (resize + flip only: a flip of the eval view) and a strong view of the
    same rows, with their stored labels (-1 where there is none)."""
    uris = write_shards(tmp_path, [6, 6])
    ld = loader(uris, backend, mode="pair", batch_size=4, columns_extra=("id",))
    plain = {i: img for b in loader(uris, backend, mode="eval", batch_size=4, columns_extra=("id",))
             for i, img in zip(b["id"], b["image"])}
    batches = list(ld)
    assert len(batches) == len(ld) == 3
    for b in batches:
        assert set(b) == {"weak", "strong", "label", "id"}
        assert b["weak"].shape == b["strong"].shape == (4, 3, SIZE, SIZE)
        for i, weak, strong, y in zip(b["id"], b["weak"], b["strong"], b["label"].tolist()):
            j = int(i.split("-")[1])
            assert y == (-1 if j % 4 == 0 else j % 3)
            ref = plain[i]
            assert any(torch.allclose(weak, r, atol=0.05) for r in (ref, ref.flip(-1)))
            assert not torch.allclose(weak, strong, atol=1e-3)


def test_train_without_weight_column_gives_ones(tmp_path):
    uris = write_shards(tmp_path, [8])
    b = next(iter(loader(uris, batch_size=8, columns_extra=("id",))))
    assert torch.equal(b["weight"], torch.ones(8))
    for i, y in zip(b["id"], b["label"].tolist()):
        j = int(i.split("-")[1])
        assert y == (-1 if j % 4 == 0 else j % 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_contract(tmp_path, backend):
    uris = write_shards(tmp_path, [5, 6])
    ld = loader(uris, backend, mode="eval", batch_size=4, columns_extra=("source",))
    assert len(ld) == 3  # 11 rows: 4 + 4 + 3, the last batch kept
    runs = [list(ld), list(ld)]
    batches = runs[0]
    assert [len(b["id"]) for b in batches] == [4, 4, 3]
    ids = [i for b in batches for i in b["id"]]
    assert ids == [f"s0-{j}" for j in range(5)] + [f"s1-{j}" for j in range(6)]
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert labels == [-1 if int(i.split("-")[1]) % 4 == 0 else int(i.split("-")[1]) % 3 for i in ids]
    assert [s for b in batches for s in b["source"]] == [f"{i}.png" for i in ids]
    for a, b in zip(*runs):  # deterministic
        assert a["image"].shape[1:] == (3, SIZE, SIZE) and a["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"]) and a["id"] == b["id"]
    if backend == "torch":  # the loader applies the reference eval transform to the stored bytes
        table = shards.read_shard(uris[0], ["image"])
        t = aug.eval_transform(SIZE, CFG)
        direct = torch.stack([t(aug.decode_rgb(b)) for b in table.column("image").to_pylist()])
        assert torch.allclose(direct, torch.cat([b["image"] for b in batches])[:5], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_of_no_shards_is_empty(backend):
    ld = loader([], backend, mode="eval")
    assert len(ld) == 0 and list(ld) == [] and list(ld) == []


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali absent")
@pytest.mark.dali
def test_dali_and_torch_eval_agree(tmp_path):
    """Same shard bytes, both backends: resampling differs slightly (DALI's antialiased linear vs PIL's
    bilinear), so pixels may differ by a few grey levels; tolerance: max 6/255, mean 0.5/255."""
    uris = write_shards(tmp_path, [9])
    d = torch.cat([b["image"] for b in loader(uris, "dali", mode="eval", batch_size=4)])
    t = torch.cat([b["image"] for b in loader(uris, "torch", mode="eval", batch_size=4)])
    diff = (d - t).abs() * torch.tensor(CFG.std).view(1, 3, 1, 1)  # back to the 0..1 scale
    assert float(diff.max()) <= 6 / 255 and float(diff.mean()) <= 0.5 / 255


# ---------------------------------------------------------------- the row stream


def test_rank_split_eval_is_disjoint_and_complete(tmp_path):
    uris = write_shards(tmp_path, [3, 4, 5, 2, 6])
    parts = [epoch_ids(loader(uris, mode="eval", rank=r, world_size=2), 0) for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(f"s{s}-{j}" for s, n in enumerate([3, 4, 5, 2, 6]) for j in range(n))
    assert {i.split("-")[0] for i in parts[0]} == {"s0", "s2", "s4"}  # shards by global rank, round-robin


@pytest.mark.parametrize("mode", ["train", "byol"])
def test_rank_split_train_equal_steps(tmp_path, mode):
    rows = [9, 4, 7, 3]  # rank 0: 16 rows, rank 1: 7 rows -> both run 7 // 2 = 3 steps
    uris = write_shards(tmp_path, rows)
    lds = [loader(uris, mode=mode, batch_size=2, rank=r, world_size=2, columns_extra=("id",)) for r in (0, 1)]
    lds_given = [loader(uris, mode=mode, batch_size=2, rank=r, world_size=2, shard_rows=rows) for r in (0, 1)]
    assert [len(x) for x in lds] == [len(x) for x in lds_given] == [3, 3]
    for epoch in range(3):
        ids = [epoch_ids(ld, epoch) for ld in lds]
        assert [len(i) for i in ids] == [6, 6]  # exactly len() full batches on every rank
        assert not set(ids[0]) & set(ids[1])
        assert {i.split("-")[0] for i in ids[0]} <= {"s0", "s2"} and {i.split("-")[0] for i in ids[1]} <= {"s1", "s3"}


def test_reshuffle_per_epoch_and_reproducible(tmp_path):
    uris = write_shards(tmp_path, [12, 12, 12])
    a = loader(uris, batch_size=4, seed=3, columns_extra=("id",))
    b = loader(uris, batch_size=4, seed=3, columns_extra=("id",))
    e0, e1 = epoch_ids(a, 0), epoch_ids(a, 1)
    assert len(e0) == len(e1) == 36 and sorted(e0) == sorted(e1)
    assert e0 != e1
    assert epoch_ids(b, 1) == e1 and epoch_ids(b, 0) == e0  # same seed + epoch = same order
    assert epoch_ids(loader(uris, batch_size=4, seed=4, columns_extra=("id",)), 0) != e0
    # rows really cross shard boundaries inside a batch at least once (the carry-over buffer)
    c = loader(uris, batch_size=4, seed=3, columns_extra=("id",))
    c.set_epoch(0)
    assert any(len({i.split("-")[0] for i in batch["id"]}) > 1 for batch in c)


def test_remainder_dropped_differs_per_epoch(tmp_path):
    uris = write_shards(tmp_path, [7])
    ld = loader(uris, batch_size=3, columns_extra=("id",))
    assert len(ld) == 2
    dropped = {frozenset({f"s0-{j}" for j in range(7)} - set(epoch_ids(ld, e))) for e in range(6)}
    assert all(len(d) == 1 for d in dropped) and len(dropped) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_rows_larger_than_shards_is_an_error(tmp_path, backend):
    """Running short of rows would desynchronise DDP: it is an error, raised through DALI too."""
    uris = write_shards(tmp_path, [4, 4])
    ld = loader(uris, backend, batch_size=2, shard_rows=[40, 40])
    with pytest.raises(DatasetError, match="fewer rows"):
        list(ld)
    with pytest.raises(ValueError, match="shard_rows"):
        loader(uris, shard_rows=[4])


def test_more_ranks_than_shards_refused(tmp_path):
    uris = write_shards(tmp_path, [4])
    with pytest.raises(DatasetError, match="cannot feed"):
        loader(uris, rank=1, world_size=2)


def test_backend_resolution(monkeypatch):
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == ("dali" if HAVE_DALI else "torch")
    monkeypatch.setattr("raysemi.data.loading.loader.dali_available", lambda: False)
    assert resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match="unknown loader backend"):
        resolve_backend("opencv")


def test_torch_backend_with_workers(tmp_path):
    """The DataLoader path with worker processes gives the same rows as in-process."""
    uris = write_shards(tmp_path, [6, 6])
    a = loader(uris, num_threads=2, columns_extra=("id",), seed=1)
    b = loader(uris, num_threads=0, columns_extra=("id",), seed=1)
    assert epoch_ids(a, 2) == epoch_ids(b, 2)
    a.set_epoch(2)
    b.set_epoch(2)
    for x, y in zip(a, b):  # per-batch seeds: the same augmentation with or without workers
        assert torch.equal(x["image"], y["image"])


def test_reads_from_s3(s3_bucket):
    uris = write_shards(s3_bucket, [5, 3])
    ids = epoch_ids(loader(uris, mode="eval", batch_size=3), 0)
    assert ids == [f"s0-{j}" for j in range(5)] + [f"s1-{j}" for j in range(3)]
    ld = loader(uris, batch_size=2, columns_extra=("id",))
    assert len(ld) == 4 and len(epoch_ids(ld, 0)) == 8


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_stream_is_the_epochs_back_to_back_and_resumes_at_a_step(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    uris = write_shards(tmp_path, [7, 6], weights=True)
    ld = loader(uris, backend=backend, mode="train", batch_size=4, seed=3)
    per_epoch = len(ld)
    assert per_epoch == 3
    want = []
    for e in range(3):
        ld.set_epoch(e)
        want += [b["weight"].tolist() for b in ld]
    got = [b["weight"].tolist() for b in ld.stream(0, 3 * per_epoch)]
    assert got == want  # step s = batch s % len of epoch s // len
    assert [b["weight"].tolist() for b in ld.stream(4, 8)] == want[4:8]  # a resumed run sees the same data
    assert list(ld.stream(5, 5)) == []
