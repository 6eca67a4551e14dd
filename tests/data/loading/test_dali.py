"""The DALI pipelines (CPU here; the GPU path runs where CUDA is) against the torchvision reference."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from raysemi.core.config import AugmentConfig
from raysemi.data import shards
from raysemi.data.loading import augment as aug
from raysemi.data.loading import dali as dali_mod
from tests.data.loading.test_loader import CFG, HI, LO, encode, make_images, one_torch_thread, write_shards  # noqa: F401

pytestmark = [
    pytest.mark.dali,
    pytest.mark.skipif(not dali_mod.dali_available(), reason="nvidia.dali absent"),
]
OFF = AugmentConfig(hflip_p=0.0, jitter_p=0.0, grey_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))
MEAN = torch.tensor(CFG.mean).view(1, 3, 1, 1)
STD = torch.tensor(CFG.std).view(1, 3, 1, 1)


def arrays(images: list[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(b, dtype=np.uint8) for b in images]


def dali_run(images: list[bytes], cfg: AugmentConfig = CFG, mode="byol", size=16, batch_size=None, seed=0):
    """All outputs of one DALI epoch over ``images`` (batches of ``batch_size``), concatenated."""
    bs = batch_size or len(images)
    runner = dali_mod.DaliRunner(mode=mode, size=size, augment=cfg, batch_size=bs, num_threads=2, seed=seed)
    feed = [(arrays(images[i : i + bs]), i) for i in range(0, len(images), bs)]
    outs = [o for o, _ in runner.run(feed)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def torch_run(images: list[bytes], cfg: AugmentConfig = CFG, size=16, seed=0):
    v1, v2 = aug.byol_views(cfg, size)
    torch.manual_seed(seed)
    ims = [aug.decode_rgb(b) for b in images]
    return torch.stack([v1(im) for im in ims]), torch.stack([v2(im) for im in ims])


def constant(value: int, fmt="PNG", size=(20, 30)) -> bytes:
    return encode(Image.new("L", size, value), fmt)


def test_missing_dali_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(dali_mod.DaliUnavailable, match="pip install nvidia-dali-cuda120"):
        dali_mod.require_dali()


def test_done_when_both_give_two_distinct_normalised_views_from_the_same_shard(tmp_path):
    """The issue's done-when: from the same shard bytes, DALI CPU and torchvision both give two distinct
    views of shape (B, 3, H, W), float32, normalised with the config's mean/std."""
    uri = write_shards(tmp_path, [8])[0]
    images = shards.read_shard(uri, ["image"]).column("image").to_pylist()
    for v1, v2 in (dali_run(images, size=32), torch_run(images, size=32)):
        for v in (v1, v2):
            assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32
            assert float(v.min()) >= LO - 1e-4 and float(v.max()) <= HI + 1e-4
            assert float(v.min()) < 0 < float(v.max())  # normalised: not on the 0..1 scale
        assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(v1, v2))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_constant_grey_maps_to_exact_normalisation(fmt):
    """A constant image is unchanged by crop, flip and blur: with jitter, greyscale and solarize off, every
    pixel of both views is (v/255 - mean)/std exactly, for both backends."""
    cfg = dataclasses.replace(CFG, jitter_p=0.0, grey_p=0.0, solarize_p=(0.0, 0.0))
    images = [constant(100, fmt), constant(200, fmt)]
    expect = (torch.tensor([100.0, 200.0]).view(2, 1, 1, 1) / 255 - MEAN) / STD
    for v1, v2 in (dali_run(images, cfg), torch_run(images, cfg)):
        for v in (v1, v2):
            assert torch.allclose(v, expect.expand_as(v), atol=1e-5)


def test_solarize_inverts_bright_pixels_in_view2_only():
    cfg = dataclasses.replace(OFF, solarize_p=(0.0, 1.0))
    images = [constant(200), constant(60)]
    for v1, v2 in (dali_run(images, cfg), torch_run(images, cfg)):
        raw1 = (v1 * STD + MEAN) * 255
        raw2 = (v2 * STD + MEAN) * 255
        assert torch.allclose(raw1[:, :, 0, 0], torch.tensor([[200.0] * 3, [60.0] * 3]), atol=1e-3)
        assert torch.allclose(raw2[:, :, 0, 0], torch.tensor([[55.0] * 3, [60.0] * 3]), atol=1e-3)


def test_brightness_jitter_is_per_sample_and_in_range():
    cfg = dataclasses.replace(OFF, jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    images = [constant(100)] * 16
    for v1, _ in (dali_run(images, cfg), torch_run(images, cfg)):
        raw = ((v1 * STD + MEAN) * 255)[:, 0, 0, 0]
        assert float(raw.min()) >= 60 - 1 and float(raw.max()) <= 140 + 1
        assert len(set(raw.round().tolist())) > 4  # a factor per sample, not per batch


def test_greyscale_inputs_stay_grey_under_the_full_recipe():
    """Hue 0 (the default): every step keeps R = G = B for a greyscale image, in both backends."""
    images = make_images(32, h=40, w=40)[::2]  # the grey PNGs and grey JPEGs
    for v1, v2 in (dali_run(images, size=24), torch_run(images, size=24)):
        for v in (v1, v2):
            raw = v * STD + MEAN
            assert float((raw - raw[:, :1]).abs().max()) <= 1.5 / 255


def test_views_follow_the_same_distribution_as_the_reference():
    """Same recipe, not the same random numbers: over 256 views of the same images, the mean and spread of
    DALI's views are those of torchvision's. The gap is sampling noise (per-view brightness, crop...):
    measured 0.02-0.13 in mean and 0.00-0.06 in std over seeds, so the bounds (0.2 / 0.1) only catch real
    recipe errors (scale, normalisation, an op always or never applied)."""
    images = make_images(4, h=32, w=32) * 64
    d1, d2 = dali_run(images, size=16)
    t1, t2 = torch_run(images, size=16)
    for d, t in ((d1, t1), (d2, t2)):
        assert abs(float(d.mean() - t.mean())) < 0.2
        assert abs(float(d.std() - t.std())) < 0.1
    assert float(d1.mean()) > float(d2.mean())  # view 2's solarize darkens bright pixels, in both
    assert float(t1.mean()) > float(t2.mean())


def test_eval_matches_torchvision():
    """Deterministic eval transform: DALI's antialiased linear resize vs PIL's bilinear differ by at most a
    few grey levels on smooth images (measured: max 1-5 levels, mean ~0.2); bounds max 6/255, mean 0.5/255."""
    images = make_images(6, h=60, w=44) + make_images(2, seed=1, h=120, w=120)
    (d,) = dali_run(images, OFF, mode="eval", size=24, batch_size=4)
    (d_again,) = dali_run(images, OFF, mode="eval", size=24, batch_size=8)
    t = torch.stack([aug.eval_transform(24, OFF)(aug.decode_rgb(b)) for b in images])
    assert torch.equal(d, d_again)
    diff = ((d - t) * STD).abs()
    assert float(diff.max()) <= 6 / 255 and float(diff.mean()) <= 0.5 / 255


def test_partial_last_batch_and_abandoned_epoch():
    images = make_images(6)
    runner = dali_mod.DaliRunner(mode="train", size=16, augment=CFG, batch_size=4, num_threads=2)
    feed = [(arrays(images[:4]), "a"), (arrays(images[4:]), "b")]
    got = [(side, outs[0].shape[0]) for outs, side in runner.run(feed)]
    assert got == [("a", 4), ("b", 2)]
    for _ in runner.run(feed):  # leave half way: batches stay in flight
        break
    assert [(side, outs[0].shape[0]) for outs, side in runner.run(feed)] == [("a", 4), ("b", 2)]


@pytest.mark.parametrize("mode", ["byol", "train", "eval"])
def test_gpu_graph_is_defined_without_a_gpu(mode):
    """The GPU branch ("mixed" decoder, GPU ops fed CPU random arguments) at least defines a graph here;
    building it needs CUDA (test below)."""
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(dali_mod._graph, enable_conditionals=True)(
        dali_mod._Feed(), mode, 32, CFG, True, batch_size=4, num_threads=1, device_id=0
    )
    assert pipe.device_id == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_decodes_on_the_device(tmp_path):
    from raysemi.data.loading.loader import build_loader

    device = torch.device("cuda", torch.cuda.current_device())
    uris = write_shards(tmp_path, [8, 8])
    ld = build_loader(uris, mode="byol", size=32, batch_size=4, augment=CFG, backend="dali", device=device)
    batches = list(ld)
    assert len(batches) == 4
    for b in batches:
        assert b["view1"].device == device and b["view1"].shape == (4, 3, 32, 32)
        assert not torch.allclose(b["view1"], b["view2"])
    ev = build_loader(uris, mode="eval", size=32, batch_size=5, augment=CFG, backend="dali", device=device)
    cpu = build_loader(uris, mode="eval", size=32, batch_size=5, augment=CFG, backend="dali")
    for g, c in zip(ev, cpu):  # nvJPEG / GPU resize vs the CPU path
        assert g["image"].device == device and g["label"].device == device
        assert float((g["image"].cpu() - c["image"]).abs().mul(STD).max()) <= 8 / 255


@pytest.mark.parametrize("policy", ["light", "trivialaugment", "randaugment"])
def test_finetune_policies_run_on_cpu(policy):
    """Each fine-tuning policy builds and runs in DALI's CPU pipeline; the light one, without a flip,
    crop or colour change, is the eval transform of a constant image, the others change pixels."""
    cfg = dataclasses.replace(OFF, finetune_policy=policy, finetune_crop_scale=(1.0, 1.0))
    images = make_images(8, h=40, w=40)
    (x,) = dali_run(images, cfg, mode="train", size=24, batch_size=4, seed=3)
    assert x.shape == (8, 3, 24, 24) and torch.isfinite(x).all()
    (grey,) = dali_run([constant(128, size=(30, 30))] * 8, cfg, mode="train", size=24, batch_size=8, seed=5)
    raw = grey * STD + MEAN
    changed = [(raw[i] - 128 / 255).abs().max().item() > 2 / 255 for i in range(8)]
    if policy == "light":
        assert not any(changed)
    else:
        assert any(changed)


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_dalis_own_deprecated_aliases_do_not_reach_the_user(policy, recwarn):
    """DALI's auto_aug policies call fn.experimental.* aliases it deprecated; that warning is dropped (it
    printed once per worker and round in every run), any other warning still shows."""
    import warnings

    cfg = dataclasses.replace(CFG, finetune_policy=policy)

    def source():
        raise StopIteration

    dali_mod.build_pipeline(source, mode="train", size=32, augment=cfg, batch_size=4)
    warnings.warn("still shown", UserWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["still shown"]
