"""The BYOL view recipe, the fine-tuning augmentation and the eval transform: the torchvision reference.

BYOL's asymmetric two-view recipe (Grill et al. 2020, arXiv 2006.07733, Table 6): random resized crop,
horizontal flip, colour jitter (p=0.8), greyscale (p=0.2), Gaussian blur (p=1.0 in view 1, 0.1 in view 2)
and solarize (p=0.0 in view 1, 0.2 in view 2). Every probability and strength comes from
:class:`~raysemi.core.config.AugmentConfig`; its defaults drop hue jitter (hue 0 = skipped), which carries no
information in greyscale radiographs. ``raysemi.data.loading.dali`` implements the same recipe as DALI pipelines;
this module is the reference that it is tested against, and the loader's ``torch`` backend.

Every transform takes a PIL image decoded as RGB (``decode_rgb``) and returns a float32 CHW tensor
normalised with ``cfg.mean`` / ``cfg.std`` (ImageNet's by default, on the 0..1 scale).

The eval transform resizes the whole image to ``size x size`` (no centre crop): the full field of view is
kept (a centre crop would cut the periphery of a non-square radiograph), at the cost of a mild aspect change
on non-square images, which training's random resized crop (aspect 3/4..4/3) already exposes the model to.
It is also the choice that DALI reproduces exactly: a shorter-side resize rounds the long side differently
in the two libraries, and the half-pixel shift of the following centre crop shows on textured images.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from raysemi.core.config import AugmentConfig

BLUR_SIGMA = (0.1, 2.0)  # BYOL: sigma ~ U(0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # pixels >= threshold are inverted (BYOL: x -> 1 - x for x >= 0.5)
RANDAUGMENT = (2, 9)  # RandAugment's N ops per image at magnitude M (Cubuk et al. 2020, ImageNet setting)
CROP_RATIO = (3 / 4, 4 / 3)

Transform = Callable[[Image.Image], torch.Tensor]


def blur_kernel_size(size: int) -> int:
    """An odd Gaussian kernel of about 10% of the image side (BYOL: 23 px at 224), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (greyscale replicated to 3 channels).

    EXIF orientation is applied, as DALI's ``decoders.image`` does by default."""
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im) or im
    return im.convert("RGB")


def _normalise(cfg: AugmentConfig) -> list[T.Transform]:
    return [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
    ]


def _colour_jitter(cfg: AugmentConfig) -> T.Transform | None:
    kw = {}
    for name in ("brightness", "contrast", "saturation", "hue"):
        v = float(getattr(cfg, name))
        if v > 0:  # 0 means "skip this one" (torchvision does the same for a zero strength)
            kw[name] = v
    return T.ColorJitter(**kw) if kw else None


def byol_view(cfg: AugmentConfig, size: int, blur_p: float, solarize_p: float) -> Transform:
    """One BYOL view: crop, flip, jitter, greyscale, blur, solarize, normalise (the BYOL order)."""
    steps: list[T.Transform] = [
        T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=CROP_RATIO, antialias=True),
    ]
    if cfg.hflip_p > 0:
        steps.append(T.RandomHorizontalFlip(p=cfg.hflip_p))
    jitter = _colour_jitter(cfg)
    if jitter is not None and cfg.jitter_p > 0:
        steps.append(T.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grey_p > 0:
        steps.append(T.RandomGrayscale(p=cfg.grey_p))  # keeps 3 channels
    if blur_p > 0:
        k = blur_kernel_size(size)
        steps.append(T.RandomApply([T.GaussianBlur(kernel_size=k, sigma=BLUR_SIGMA)], p=blur_p))
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    return T.Compose(steps + _normalise(cfg))


def byol_views(cfg: AugmentConfig, size: int) -> tuple[Transform, Transform]:
    """The two asymmetric view transforms (view 1: ``blur_p[0]``, ``solarize_p[0]``; view 2: the second)."""
    return (
        byol_view(cfg, size, cfg.blur_p[0], cfg.solarize_p[0]),
        byol_view(cfg, size, cfg.blur_p[1], cfg.solarize_p[1]),
    )


def train_transform(size: int, cfg: AugmentConfig) -> Transform:
    """Fine-tuning augmentation: random resized crop (``cfg.finetune_crop_scale``), horizontal flip, then
    the ``cfg.finetune_policy``: nothing more ("light", the method paper's), torchvision's
    ``TrivialAugmentWide`` (Mueller & Hutter 2021, arXiv 2103.10158) or ``RandAugment(2, 9)``; normalise.

    The policies act on the uint8 image (their magnitudes are defined on 0..255), after the crop so
    that they cost ``size x size`` pixels, not the stored image's."""
    steps: list[T.Transform] = [
        T.RandomResizedCrop(size, scale=tuple(cfg.finetune_crop_scale), ratio=CROP_RATIO, antialias=True),
    ]
    if cfg.hflip_p > 0:
        steps.append(T.RandomHorizontalFlip(p=cfg.hflip_p))
    if cfg.finetune_policy == "trivialaugment":
        steps.append(T.TrivialAugmentWide())
    elif cfg.finetune_policy == "randaugment":
        steps.append(T.RandAugment(num_ops=RANDAUGMENT[0], magnitude=RANDAUGMENT[1]))
    elif cfg.finetune_policy != "light":
        raise ValueError(f"unknown fine-tuning policy {cfg.finetune_policy!r}")
    return T.Compose(steps + _normalise(cfg))


def weak_transform(size: int, cfg: AugmentConfig) -> Transform:
    """The weak view of a pool image in FixMatch (Sohn et al. 2020): the eval transform plus a horizontal flip,
    so that the teacher labels images as validation measures it."""
    steps: list[T.Transform] = [T.Resize((size, size), antialias=True)]
    if cfg.hflip_p > 0:
        steps.append(T.RandomHorizontalFlip(p=cfg.hflip_p))
    return T.Compose(steps + _normalise(cfg))


def eval_transform(size: int, cfg: AugmentConfig) -> Transform:
    """Deterministic: resize to ``size x size`` (bilinear, antialiased), normalise."""
    return T.Compose([T.Resize((size, size), antialias=True), *_normalise(cfg)])
