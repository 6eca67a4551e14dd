"""Heads, BYOL (online/target split, EMA) and the fine-tuning Classifier, on tiny CPU models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raysemi.ml.losses import cross_entropy, symmetric_byol_loss
from raysemi.models.backbone import create_backbone
from raysemi.models.byol import BYOL, Classifier, byol_forward, ema_update
from raysemi.models.heads import ClassifierHead, PredictionHead, ProjectionHead

B, PX, HID, PROJ = 4, 32, 32, 16


@pytest.fixture(scope="module")
def byol_template() -> BYOL:
    torch.manual_seed(0)
    return BYOL(create_backbone("resnet18", small_image=True), 512, HID, PROJ, HID)


@pytest.fixture
def byol(byol_template) -> BYOL:
    return copy.deepcopy(byol_template)


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, PX, PX, generator=g), torch.randn(B, 3, PX, PX, generator=g)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---- heads -----------------------------------------------------------------------------------------


def test_heads_structure_and_defaults():
    proj = ProjectionHead(512)
    assert [type(m) for m in proj.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert proj.net[0].bias is None and proj.net[3].bias is not None  # no bias before BN
    assert (proj.net[0].in_features, proj.net[0].out_features, proj.net[3].out_features) == (512, 4096, 256)
    pred = PredictionHead()
    assert (pred.net[0].in_features, pred.net[0].out_features, pred.net[3].out_features) == (256, 4096, 256)
    assert ProjectionHead(8, 16, 4)(torch.randn(3, 8)).shape == (3, 4)
    head = ClassifierHead(16, 5, dropout=0.2)
    assert head(torch.randn(3, 16)).shape == (3, 5)
    with pytest.raises(ValueError):
        ClassifierHead(16, 0)


# ---- BYOL ------------------------------------------------------------------------------------------


def test_byol_forward_shapes_and_target_no_grad(byol):
    byol.train()
    out = byol(*_views())
    assert set(out) == {"p1", "p2", "z1_t", "z2_t", "y1"}
    for k in ("p1", "p2", "z1_t", "z2_t"):
        assert out[k].shape == (B, PROJ)
    assert out["y1"].shape == (B, 512)
    assert out["p1"].requires_grad and out["p2"].requires_grad
    assert not out["z1_t"].requires_grad and not out["z2_t"].requires_grad
    assert not out["y1"].requires_grad
    assert all(not p.requires_grad for p in byol.target.parameters())
    # the named views point at the same modules
    assert byol.backbone is byol.online.backbone and byol.target_projector is byol.target.projector


def test_target_starts_equal_to_online(byol):
    on, tg = byol.backbone.state_dict(), byol.target_backbone.state_dict()
    assert all(torch.equal(on[k], tg[k]) for k in on)
    on, tg = byol.projector.state_dict(), byol.target_projector.state_dict()
    assert all(torch.equal(on[k], tg[k]) for k in on)


def test_backward_and_step_touch_online_only(byol):
    byol.train()
    opt = torch.optim.SGD(byol.online.parameters(), lr=0.1)
    online0, target_params0 = _state(byol.online), [p.detach().clone() for p in byol.target.parameters()]
    loss = symmetric_byol_loss(byol(*_views()))
    assert 0.0 <= loss.item() <= 8.0
    loss.backward()
    assert all(p.grad is None for p in byol.target.parameters())
    assert all(p.grad is not None for p in byol.online.parameters())
    opt.step()
    online1 = byol.online.state_dict()
    assert not torch.equal(online0["backbone.conv1.weight"], online1["backbone.conv1.weight"])
    assert not torch.equal(online0["predictor.net.3.weight"], online1["predictor.net.3.weight"])
    assert all(torch.equal(a, b) for a, b in zip(target_params0, byol.target.parameters()))


def test_byol_forward_with_separate_online_wrapper(byol):
    # what a DDP-wrapped online network looks like to byol_forward: any module with the same forward
    byol.eval()
    x1, x2 = _views()
    a = byol(x1, x2)
    b = byol_forward(byol.online, byol.target, x1, x2)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_ema_update_matches_formula_including_bn_buffers():
    torch.manual_seed(0)
    online, target = _tiny(), _tiny()
    online.train()
    online(torch.randn(8, 3) * 3 + 1)  # move BN running stats away from their init
    online(torch.randn(8, 3))
    target.train()
    target(torch.randn(8, 3))
    on, tg = _state(online), _state(target)
    assert not torch.equal(on["1.running_mean"], tg["1.running_mean"])
    tau = 0.9
    ema_update(online, target, tau)
    new = target.state_dict()
    for k in on:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(new[k], on[k])  # integer buffer: online value
        else:
            assert torch.allclose(new[k], tau * tg[k] + (1 - tau) * on[k], atol=1e-7), k
    assert int(new["1.num_batches_tracked"]) == 2


def test_ema_update_tau_one_and_zero():
    torch.manual_seed(0)
    online, target = _tiny(), _tiny()
    online.train()
    online(torch.randn(8, 3))
    tg = _state(target)
    ema_update(online, target, 1.0)
    new = target.state_dict()
    assert all(torch.equal(new[k], tg[k]) for k in tg if not k.endswith("num_batches_tracked"))
    ema_update(online, target, 0.0)
    on, new = online.state_dict(), target.state_dict()
    assert all(torch.equal(new[k], on[k]) for k in on)
    with pytest.raises(ValueError):
        ema_update(online, target, 1.5)
    with pytest.raises(ValueError):
        ema_update(online, nn.Linear(3, 4), 0.5)


def test_update_target_moves_target_towards_online(byol):
    with torch.no_grad():
        for p in byol.online.parameters():
            p.add_(1.0)
    tg0 = byol.target_backbone.conv1.weight.detach().clone()
    byol.update_target(0.75)
    expected = 0.75 * tg0 + 0.25 * byol.backbone.conv1.weight
    assert torch.allclose(byol.target_backbone.conv1.weight, expected, atol=1e-6)
    # the predictor has no target counterpart and the target stays gradient-free
    assert all(not p.requires_grad for p in byol.target.parameters())


# ---- Classifier ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["projector", "encoder"])
def test_classifier_heads_give_logits(byol, head):
    clf = Classifier.from_byol(byol, num_classes=3, head=head).eval()
    x = _views()[0]
    assert clf(x).shape == (B, 3)
    assert clf.backbone(x).shape == (B, 512)
    assert clf.head_type == head
    assert clf.head.fc.in_features == (PROJ if head == "projector" else 512)
    assert (clf.projector is None) == (head == "encoder")


def test_classifier_args_checked():
    backbone = create_backbone("resnet18", small_image=True)
    with pytest.raises(ValueError, match="projector"):
        Classifier(backbone, 3, head="projector")
    with pytest.raises(ValueError):
        Classifier(backbone, 3, head="bogus")  # type: ignore[arg-type]
    assert Classifier(backbone, 3, head="encoder").head.fc.in_features == 512


def test_from_byol_copies_weights(byol):
    with torch.no_grad():  # make online differ from target so we know which one was copied
        for p in byol.online.parameters():
            p.mul_(1.5)
    from_model = Classifier.from_byol(byol, num_classes=2)
    assert all(
        torch.equal(v, from_model.backbone.state_dict()[k]) for k, v in byol.backbone.state_dict().items()
    )
    assert all(
        torch.equal(v, from_model.projector.state_dict()[k]) for k, v in byol.projector.state_dict().items()
    )
    assert from_model.backbone is not byol.backbone  # a copy, not shared

    for sd in (byol.state_dict(), {f"module.{k}": v for k, v in byol.online.state_dict().items()}):
        fresh = create_backbone("resnet18", small_image=True)
        clf = Classifier.from_byol(sd, num_classes=2, backbone=fresh)
        for k, v in byol.backbone.state_dict().items():
            assert torch.equal(v, clf.backbone.state_dict()[k]), k
        for k, v in byol.projector.state_dict().items():
            assert torch.equal(v, clf.projector.state_dict()[k]), k
        assert (clf.projector.hidden_dim, clf.projector.out_dim) == (HID, PROJ)
    with pytest.raises(ValueError, match="backbone"):
        Classifier.from_byol(byol.state_dict(), num_classes=2)


def test_freeze_backbone_linear_probe(byol):
    clf = Classifier.from_byol(byol, num_classes=3, head="encoder")
    clf.freeze_backbone()
    clf.train()
    assert not clf.backbone.training and clf.head.training
    bb0 = _state(clf.backbone)
    head0 = clf.head.fc.weight.detach().clone()
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.5)
    assert len(opt.param_groups[0]["params"]) == 2  # only the linear head
    x, y = _views()[0], torch.tensor([0, 1, 2, 0])
    cross_entropy(clf(x), y).backward()
    opt.step()
    bb1 = clf.backbone.state_dict()
    assert all(torch.equal(bb0[k], bb1[k]) for k in bb0)  # weights and BN running stats
    assert not torch.equal(head0, clf.head.fc.weight)


def test_finetune_step_trains_projector(byol):
    clf = Classifier.from_byol(byol, num_classes=3, head="projector").train()
    proj0 = clf.projector.net[0].weight.detach().clone()
    opt = torch.optim.SGD(clf.parameters(), lr=0.5)
    cross_entropy(clf(_views()[0]), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert not torch.equal(proj0, clf.projector.net[0].weight)
