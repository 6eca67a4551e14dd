"""Precision and layout by what the hardware has: the choice, and bf16 / channels_last against fp32 numerics."""

from __future__ import annotations

import pytest
import torch

from raysemi.core.config import load_config
from raysemi.ml import compute as compute_mod
from raysemi.ml.compute import Compute, compute_for, resolve_precision
from raysemi.ml.losses import cross_entropy, symmetric_byol_loss
from raysemi.models.byol import byol_forward
from raysemi.models.checkpoint import build_classifier
from raysemi.stages import pretrain

CPU = torch.device("cpu")
TINY = ["model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "model.pred_hidden_dim=64", "finetune.drop_path_rate=0.0"]


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names: str) -> None:
        monkeypatch.setattr(compute_mod, "cpu_flags", lambda: frozenset(names))
    return set_flags


def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(flags):
    flags("sse4_2", "avx2", "avx512f")  # an AMD EPYC of this project's kind: no bf16 units
    assert resolve_precision("auto", CPU) == "fp32"
    flags("avx512f", "avx512_bf16")
    assert resolve_precision("auto", CPU) == "bf16"
    flags("amx_tile", "amx_bf16")
    assert resolve_precision("auto", CPU) == "bf16"
    # Explicit choices are taken as given, whatever the hardware.
    flags()
    assert [resolve_precision(p, CPU) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", CPU)


def test_compute_for_describes_what_runs(flags):
    flags()
    c = compute_for(CPU, "auto", channels_last=True)
    assert c == Compute(CPU, "fp32", True)
    assert c.describe() == {"device": "cpu", "precision": "fp32", "channels_last": True, "cpu_bf16_units": False,
                            "torch_threads": torch.get_num_threads()}
    assert not c.grad_scaler().is_enabled() and not Compute(CPU, "bf16").grad_scaler().is_enabled()
    assert Compute(CPU, "fp16").grad_scaler().is_enabled()


def test_bf16_autocast_really_runs_in_bf16_and_keeps_the_weights_fp32():
    cfg = load_config(None, TINY)
    model = build_classifier(cfg, 3).eval()
    c = Compute(CPU, "bf16", channels_last=True)
    c.model(model)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == torch.float32 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = c.images(torch.randn(2, 3, 32, 32))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with c.autocast():
        assert conv(x).dtype == torch.bfloat16
    with Compute(CPU, "fp32").autocast():
        assert conv(x).dtype == torch.float32


def _byol_loss_and_grads(c: Compute, batch_seed: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = c.model(pretrain.build_byol(cfg).train())
    g = torch.Generator().manual_seed(batch_seed)
    x1, x2 = torch.randn(2, 16, 3, 32, 32, generator=g).unbind(0)
    with c.autocast():
        out = byol_forward(model.online, model.target, c.images(x1), c.images(x2))
    loss = symmetric_byol_loss({k: v.float() for k, v in out.items()})
    loss.backward()
    return float(loss.detach()), {k: p.grad.detach().clone() for k, p in model.online.named_parameters() if p.grad is not None}


def _classifier_loss_and_grads(c: Compute, batch_seed: int = 2) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = c.model(build_classifier(cfg, 3).train())
    g = torch.Generator().manual_seed(batch_seed)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g)
    with c.autocast():
        logits = model(c.images(x))
    loss = cross_entropy(logits.float(), y, weights=torch.ones(16), class_weights=None, label_smoothing=0.1)
    loss.backward()
    return float(loss.detach()), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("step", [_byol_loss_and_grads, _classifier_loss_and_grads], ids=["byol", "classifier"])
def test_bf16_gives_fp32s_loss_and_gradients_within_tolerance(step):
    """bf16 keeps 8 bits of mantissa: at a random init on a batch of 16 the loss agrees to 1% and the gradient
    of the whole network points the same way (cosine > 0.95; measured 0.96-0.98), every tensor's within
    cosine 0.85 and 15% of its norm. Gradients of another batch are far further apart (checked too)."""
    loss32, grads32 = step(Compute(CPU, "fp32"))
    loss16, grads16 = step(Compute(CPU, "bf16"))
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert grads16.keys() == grads32.keys() and len(grads32) > 10
    flat = [torch.cat([g[k].flatten() for k in grads32]) for g in (grads16, grads32)]
    assert _cosine(*flat) > 0.95
    for k in grads32:
        if grads32[k].norm() < 1e-6:
            continue
        assert _cosine(grads16[k], grads32[k]) > 0.85, k
        assert float(grads16[k].norm() / grads32[k].norm()) == pytest.approx(1.0, abs=0.15), k
    _, other = step(Compute(CPU, "fp32"), batch_seed=7)
    assert _cosine(torch.cat([other[k].flatten() for k in grads32]), flat[1]) < 0.5


@pytest.mark.parametrize("step", [_byol_loss_and_grads, _classifier_loss_and_grads], ids=["byol", "classifier"])
def test_channels_last_changes_the_layout_not_the_numbers(step):
    loss_a, grads_a = step(Compute(CPU, "fp32", channels_last=False))
    loss_b, grads_b = step(Compute(CPU, "fp32", channels_last=True))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-3, atol=1e-5)
