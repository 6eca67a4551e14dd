"""Decode once: the torch loader decodes each row a single time and augments later epochs from kept pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raysemi.data.loading import augment as aug
from raysemi.data.loading import torch_backend
from raysemi.data.loading.decoded_cache import CACHE_SCALE, DecodedCache, fit, to_image
from tests.data.loading.test_loader import SIZE, loader, smooth_image, write_shards


@pytest.fixture
def decodes(monkeypatch):
    """Counts the encoded images decoded (in this process: the loaders here run without workers)."""
    count = {"n": 0}
    real = aug.decode_rgb

    def counting(data: bytes):
        count["n"] += 1
        return real(data)

    monkeypatch.setattr(torch_backend.aug, "decode_rgb", counting)
    return count


def run_epoch(ld, epoch: int) -> list[dict]:
    ld.set_epoch(epoch)
    return list(ld)


def test_fit_keeps_greyscale_in_one_channel_and_caps_the_shorter_side():
    rng = np.random.default_rng(0)
    grey = smooth_image(rng, 200, 300, grey=True).convert("RGB")  # decode_rgb replicates grey to RGB
    kept = fit(grey, "byol", 32)
    assert kept.dtype == np.uint8 and kept.shape == (CACHE_SCALE * 32, 96)  # shorter side 64, aspect kept
    colour = smooth_image(rng, 40, 48)
    assert fit(colour, "train", 32).shape == (40, 48, 3)  # smaller than the cap: never upscaled
    assert to_image(kept).mode == "RGB" and to_image(kept).size == (96, 64)
    # eval keeps exactly what the eval transform feeds its normalisation: size x size.
    assert fit(colour, "eval", 24).shape == (24, 24, 3)


def test_eval_with_the_cache_is_bit_identical_to_without(tmp_path):
    uris = write_shards(tmp_path, [7, 5])
    plain = loader(uris, mode="eval")
    cached = loader(uris, mode="eval", decode_cache_mb=64)
    want = torch.cat([b["image"] for b in plain])
    for _ in range(2):  # the first pass fills the cache, the second reads it
        got = torch.cat([b["image"] for b in cached])
        assert torch.equal(got, want)
    assert len(cached.cache) == 12


@pytest.mark.parametrize("mode", ["byol", "train"])
def test_each_row_is_decoded_once_and_later_epochs_match_a_fresh_decode(tmp_path, decodes, mode):
    uris = write_shards(tmp_path, [8, 8])
    a = loader(uris, mode=mode, decode_cache_mb=64, seed=3)
    epochs = [run_epoch(a, e) for e in range(3)]
    # 16 rows, 4 batches of 4 per epoch: every row seen in epoch 0 is decoded then and never again.
    first_epoch_rows = sum(len(b["label"]) for b in epochs[0]) if mode == "train" else 16
    assert decodes["n"] <= 16 and decodes["n"] >= first_epoch_rows
    assert len(a.cache) == decodes["n"]
    # A loader that decodes epoch 2 afresh (its cache empty) gives the same tensors as the one reading kept pixels.
    b = loader(uris, mode=mode, decode_cache_mb=64, seed=3)
    for x, y in zip(epochs[2], run_epoch(b, 2)):
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k


def test_without_the_cache_every_epoch_decodes(tmp_path, decodes):
    uris = write_shards(tmp_path, [8])
    ld = loader(uris, mode="byol")
    assert ld.cache is None
    for e in range(2):
        run_epoch(ld, e)
    assert decodes["n"] == 16


def test_a_full_cache_keeps_what_fits_and_decodes_the_rest(tmp_path, decodes, caplog):
    uris = write_shards(tmp_path, [8])
    ld = loader(uris, mode="eval")
    ld_small = loader(uris, mode="eval", decode_cache_mb=1)
    budget = 3 * SIZE * SIZE * 3  # room for three colour images (grey ones take a third of that)
    ld_small.cache = DecodedCache(budget)
    want = torch.cat([b["image"] for b in ld])
    with caplog.at_level("INFO"):
        for _ in range(2):
            assert torch.equal(torch.cat([b["image"] for b in ld_small]), want)
    assert ld_small.cache.full and 3 <= len(ld_small.cache) < 8 and ld_small.cache.nbytes <= budget
    assert "cache full" in caplog.text


def test_the_cache_lives_in_the_loaders_process_with_decode_workers(tmp_path):
    """With DataLoader worker processes the pixels come back to the loader and are shipped out again."""
    uris = write_shards(tmp_path, [6, 6])
    a = loader(uris, mode="train", num_threads=2, decode_cache_mb=64, seed=1)
    b = loader(uris, mode="train", num_threads=0, decode_cache_mb=64, seed=1)
    for e in range(2):
        for x, y in zip(run_epoch(a, e), run_epoch(b, e)):
            assert torch.equal(x["image"], y["image"])
    assert len(a.cache) == len(b.cache) > 0


def test_dali_keeps_nothing(tmp_path):
    pytest.importorskip("nvidia.dali")
    uris = write_shards(tmp_path, [4])
    assert loader(uris, backend="dali", mode="eval", decode_cache_mb=64).cache is None


def test_pixels_of_a_colour_image_round_trip():
    im = Image.fromarray((np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3))
    assert np.array_equal(np.asarray(to_image(fit(im, "eval", 24))), np.asarray(im))
