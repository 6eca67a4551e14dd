"""The torchvision reference: BYOL's two views, the fine-tuning and the eval transforms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from raysemi.core.config import AugmentConfig
from raysemi.data.loading import augment as aug
from tests.data.loading.test_loader import HI, LO, encode, one_torch_thread, smooth_image  # noqa: F401

CFG = AugmentConfig()
MEAN = torch.tensor(CFG.mean).view(3, 1, 1)
STD = torch.tensor(CFG.std).view(3, 1, 1)


def _find(transform, kind):
    """Transforms of type ``kind`` anywhere inside a Compose / RandomApply tree."""
    found = []
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, kind):
            found.append(t)
        stack.extend(getattr(t, "transforms", []))
    return found


def test_blur_kernel_is_odd_and_about_a_tenth():
    assert aug.blur_kernel_size(224) == 23  # BYOL's 23 px
    assert aug.blur_kernel_size(64) == 7
    assert aug.blur_kernel_size(16) == 3
    assert all(aug.blur_kernel_size(s) % 2 == 1 for s in range(16, 300))


def test_views_are_asymmetric_as_configured():
    v1, v2 = aug.byol_views(CFG, 64)
    (b1,) = [r for r in _find(v1, T.RandomApply) if isinstance(r.transforms[0], T.GaussianBlur)]
    (b2,) = [r for r in _find(v2, T.RandomApply) if isinstance(r.transforms[0], T.GaussianBlur)]
    assert b1.p == 1.0 and b2.p == 0.1
    assert tuple(b1.transforms[0].kernel_size) == (7, 7) and tuple(b1.transforms[0].sigma) == (0.1, 2.0)
    assert not _find(v1, T.RandomSolarize)  # p = 0: left out
    (sol,) = _find(v2, T.RandomSolarize)
    assert sol.p == 0.2 and sol.threshold == 128
    (jitter,) = _find(v1, T.ColorJitter)
    assert jitter.hue is None and jitter.brightness == (0.6, 1.4)  # hue 0: skipped
    assert _find(v1, T.RandomGrayscale)[0].p == 0.2
    with_hue = aug.byol_views(dataclasses.replace(CFG, hue=0.1), 64)[0]
    assert _find(with_hue, T.ColorJitter)[0].hue == (-0.1, 0.1)


def test_byol_views_shape_dtype_bounds_and_distinct():
    rng = np.random.default_rng(0)
    im = smooth_image(rng, 50, 60)
    v1, v2 = aug.byol_views(CFG, 32)
    torch.manual_seed(0)
    a, b = v1(im), v2(im)
    for x in (a, b):
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert float(x.min()) >= LO - 1e-4 and float(x.max()) <= HI + 1e-4
    assert not torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(a, v1(im), atol=1e-3)  # random every call


def test_constant_grey_with_augmentation_off_is_exact_normalisation():
    cfg = dataclasses.replace(CFG, jitter_p=0.0, grey_p=0.0, solarize_p=(0.0, 0.0), finetune_policy="light")
    im = aug.decode_rgb(encode(Image.new("L", (30, 20), 77), "PNG"))
    for t in (*aug.byol_views(cfg, 16), aug.train_transform(16, cfg), aug.eval_transform(16, cfg)):
        x = t(im)
        assert torch.allclose(x, ((77 / 255 - MEAN) / STD).expand(3, 16, 16), atol=1e-6)


def test_decode_rgb_replicates_grey_and_keeps_colour():
    grey = aug.decode_rgb(encode(Image.new("L", (5, 4), 90), "PNG"))
    assert grey.mode == "RGB" and grey.size == (5, 4) and grey.getpixel((0, 0)) == (90, 90, 90)
    colour = aug.decode_rgb(encode(Image.new("RGB", (5, 4), (10, 20, 30)), "PNG"))
    assert colour.getpixel((2, 2)) == (10, 20, 30)


def test_eval_transform_is_deterministic_full_image_resize():
    im = Image.new("L", (80, 40), 0)
    im.paste(255, (0, 0, 8, 40))  # a white band on the left edge: a centre crop would cut it off
    t = aug.eval_transform(20, CFG)
    x = t(im.convert("RGB"))
    assert x.shape == (3, 20, 20) and torch.equal(x, t(im.convert("RGB")))
    raw = x * STD + MEAN
    assert float(raw[0, :, 0].mean()) > 0.9 and float(raw[0, :, -1].mean()) < 0.05


@pytest.mark.parametrize(
    "policy, cls",
    [("light", None), ("trivialaugment", T.TrivialAugmentWide), ("randaugment", T.RandAugment)],
)
def test_train_transform_policies(policy, cls):
    cfg = dataclasses.replace(CFG, finetune_policy=policy, finetune_crop_scale=(0.3, 0.9))
    t = aug.train_transform(24, cfg)
    (crop,) = _find(t, T.RandomResizedCrop)
    assert crop.scale == (0.3, 0.9)
    found = _find(t, T.TrivialAugmentWide) + _find(t, T.RandAugment)
    assert [type(f) for f in found] == ([cls] if cls else [])
    if policy == "randaugment":
        assert (found[0].num_ops, found[0].magnitude) == aug.RANDAUGMENT
    im = smooth_image(np.random.default_rng(1), 40, 40)
    torch.manual_seed(0)
    xs = [t(im) for _ in range(6)]
    assert all(x.shape == (3, 24, 24) and x.dtype == torch.float32 for x in xs)


def test_train_transform_shape_and_randomness():
    im = smooth_image(np.random.default_rng(1), 40, 40)
    t = aug.train_transform(24, CFG)
    (crop,) = _find(t, T.RandomResizedCrop)
    assert crop.scale == CFG.finetune_crop_scale
    torch.manual_seed(0)
    xs = [t(im) for _ in range(4)]
    assert all(x.shape == (3, 24, 24) and x.dtype == torch.float32 for x in xs)
    assert not torch.allclose(xs[0], xs[1])


@pytest.mark.parametrize("size", [16, 64])
def test_grey_image_stays_grey_under_the_full_recipe(size):
    im = aug.decode_rgb(encode(smooth_image(np.random.default_rng(2), 48, 48, grey=True), "JPEG"))
    torch.manual_seed(1)
    for t in aug.byol_views(CFG, size):
        for _ in range(4):
            raw = t(im) * STD + MEAN
            assert float((raw - raw[:1]).abs().max()) <= 1.5 / 255
