"""Backbones: any timm model as a pooled-feature encoder, plus a small-image stem adaptation.

Backbones come only through ``timm.create_model(name, pretrained=False, num_classes=0)``, so the
contract is timm's: ``forward(x)`` returns pooled features of size ``feature_dim(model)``
(``num_features``, or ``head_hidden_size`` where timm has a pre-logits layer)
(``forward_features`` / ``reset_classifier`` work as usual). Weights are never downloaded here;
pretrained initialisation is BYOL's job.

Small-image adaptation (``small_image=True``, for 28-64 px inputs such as MedMNIST): an ImageNet stem
downsamples by 4 before the first stage (7x7 stride-2 conv + stride-2 max-pool), which leaves a 32 px
image at 8x8 before stage 1 and 1x1 at the end. The CIFAR recipe (He et al. 2016, sec. 4.2; SimCLR
appendix B.9; lightly's CIFAR-10 benchmarks) keeps full resolution in the stem instead:

- ResNet-like (``conv1`` + ``maxpool``): ``conv1`` becomes a 3x3 stride-1 conv and ``maxpool`` an
  ``nn.Identity``; for deep stems (``resnet*d``, ``conv1`` a Sequential) the first conv gets stride 1.
- EfficientNet / MobileNet / MixNet-like (``conv_stem`` conv, stride 2): its stride becomes 1.
- Patchify stems (``stem`` a Sequential whose first conv has stride == kernel, e.g. ConvNeXt's 4x4/4):
  that conv becomes a 3x3 stride-1 conv.
- Anything else (ViT, RegNet, ...): left unchanged, with one warning per model name.
"""

from __future__ import annotations

import logging

import timm
import torch.nn as nn

from raysemi.core.config import ModelConfig

logger = logging.getLogger(__name__)

# Model names already warned about (the warning fires once per name per process).
_WARNED_NO_ADAPTATION: set[str] = set()


def create_backbone(name: str, small_image: bool = False, in_chans: int = 3, **timm_kwargs) -> nn.Module:
    """Build timm model ``name`` without a classifier; its forward returns ``(B, num_features)``.

    ``small_image`` adapts the stem for 28-64 px inputs (see the module docstring). Extra keyword
    arguments (e.g. ``drop_path_rate``) go to ``timm.create_model``.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    # pretrained=False always: no download at run time, BYOL provides the initialisation.
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    if small_image:
        adapt_small_image(model, name)
    return model


def backbone_for(model: ModelConfig, **timm_kwargs) -> nn.Module:
    """``create_backbone`` of the config's ``model`` section: what every stage builds from a config."""
    return create_backbone(model.backbone, small_image=model.small_image, **timm_kwargs)


def feature_dim(backbone: nn.Module) -> int:
    """Size of the pooled features a ``create_backbone`` model returns.

    That is timm's ``num_features``, except for models with a pre-logits layer after pooling
    (MobileNetV3: 576 -> 1024), where timm calls the forward's output size ``head_hidden_size``.
    """
    inner = unwrap(backbone)
    dim = getattr(inner, "head_hidden_size", None) or getattr(inner, "num_features", None)
    if not isinstance(dim, int):
        raise ValueError(f"{type(inner).__name__} has no integer num_features; is it a timm model?")
    return dim


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel / ``torch.compile`` wrappers (callers pass what they hold)."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def _stride1_3x3(conv: nn.Conv2d) -> nn.Conv2d:
    """A fresh 3x3 stride-1 'same' conv with the channels of ``conv`` (CIFAR-style stem)."""
    return nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=conv.bias is not None
    )


def adapt_small_image(model: nn.Module, name: str = "") -> bool:
    """Adapt ``model``'s stem in place for 28-64 px inputs; return whether a known stem was found."""
    conv1 = getattr(model, "conv1", None)
    if conv1 is not None and hasattr(model, "maxpool"):
        if isinstance(conv1, nn.Conv2d):
            model.conv1 = _stride1_3x3(conv1)
        elif isinstance(conv1, nn.Sequential):
            # Deep stem (three 3x3 convs): drop the downsampling of the first one only.
            first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        else:
            return _warn_unadapted(name or type(model).__name__)
        model.maxpool = nn.Identity()
        return True

    conv_stem = getattr(model, "conv_stem", None)
    if isinstance(conv_stem, nn.Conv2d):
        # timm's Conv2dSame subclasses Conv2d and derives its padding from the stride, so this is safe.
        conv_stem.stride = (1, 1)
        return True

    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Sequential) and len(stem) and isinstance(stem[0], nn.Conv2d):
        first = stem[0]
        if first.stride == first.kernel_size and first.stride != (1, 1):
            stem[0] = _stride1_3x3(first)
            return True

    return _warn_unadapted(name or type(model).__name__)


def _warn_unadapted(name: str) -> bool:
    if name not in _WARNED_NO_ADAPTATION:
        _WARNED_NO_ADAPTATION.add(name)
        logger.warning(
            "small_image=True: no known stem in %s, left unchanged (it will downsample small images hard)",
            name,
        )
    return False
