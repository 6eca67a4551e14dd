"""Backbones: timm contract, unknown names, small-image stem adaptation."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from raysemi.models import backbone as bb
from raysemi.models.backbone import create_backbone, feature_dim


def test_resnet18_small_image_features():
    model = create_backbone("resnet18", small_image=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)
    assert feature_dim(model) == 512


def test_small_image_stem_is_3x3_stride1():
    model = create_backbone("resnet18", small_image=True)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    # 32 px keeps full resolution in the stem: 32 / 8 (three stride-2 stages) = 4.
    with torch.no_grad():
        assert model.eval().forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_default_stem_unchanged():
    model = create_backbone("resnet18")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_in_chans_grayscale():
    model = create_backbone("resnet18", small_image=True, in_chans=1).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 512)


def test_unknown_name_raises_with_name():
    with pytest.raises(ValueError, match="not_a_model_xyz"):
        create_backbone("not_a_model_xyz")


def test_conv_stem_family_adapted():
    model = create_backbone("mobilenetv3_small_050", small_image=True)
    assert model.conv_stem.stride == (1, 1)
    # timm's pre-logits layer: forward's output size is head_hidden_size, not num_features.
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, feature_dim(model))


def test_unknown_stem_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(bb, "_WARNED_NO_ADAPTATION", set())
    with caplog.at_level(logging.WARNING, logger="raysemi.models.backbone"):
        assert bb.adapt_small_image(nn.Linear(2, 2), "toy") is False
        assert bb.adapt_small_image(nn.Linear(2, 2), "toy") is False
    assert sum("toy" in r.getMessage() for r in caplog.records) == 1


def test_feature_dim_unwraps_compile_like_wrapper():
    model = create_backbone("resnet18")

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert feature_dim(Wrapper(model)) == 512
    with pytest.raises(ValueError):
        feature_dim(nn.Linear(2, 2))
