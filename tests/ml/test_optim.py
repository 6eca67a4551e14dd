"""Optimizers: LARS against a hand-computed update; 1-D params excluded from weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raysemi.ml.optim import LARS, build_optimizer, param_groups, set_lr


def test_lars_one_step_matches_hand_computation():
    w0 = torch.tensor([[3.0, 4.0]])  # |w| = 5
    g = torch.tensor([[0.6, 0.8]])
    lr, wd, eta = 0.5, 0.1, 0.001
    p = nn.Parameter(w0.clone())
    opt = LARS([p], lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    p.grad = g.clone()
    opt.step()
    d = g + wd * w0  # [[0.9, 1.2]], |d| = 1.5
    ratio = eta * 5.0 / 1.5
    expected = w0 - lr * ratio * d
    assert torch.allclose(p.detach(), expected, atol=1e-7)
    assert p[0, 0].item() == pytest.approx(3.0 - 0.5 * (0.005 / 1.5) * 0.9)

    # second step: momentum buffer = 0.9 * buf + d_new
    w1 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    d1 = g + wd * w1
    d1 = d1 * eta * w1.norm() / d1.norm()
    buf = 0.9 * (ratio * d) + d1
    assert torch.allclose(p.detach(), w1 - lr * buf, atol=1e-7)


def test_lars_excluded_group_is_plain_sgd_momentum():
    b = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([{"params": [b], "weight_decay": 0.0, "lars_adaptation": False}], lr=0.1, weight_decay=0.5)
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.95, -2.05]))


def test_lars_zero_weight_uses_ratio_one():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([p], lr=0.1, momentum=0.0)
    p.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((2, 2), -0.1))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw", "LARS"])
def test_build_optimizer_excludes_1d_from_weight_decay(name):
    model = _model()
    opt = build_optimizer(name, model, lr=0.1, weight_decay=0.01)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }
    if name.lower() == "lars":
        assert decay["lars_adaptation"] and not no_decay["lars_adaptation"]


def test_weight_decay_not_applied_to_bias_in_a_step():
    # zero gradients: only weight decay moves parameters
    model = nn.Linear(3, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer("sgd", model, lr=0.1, weight_decay=0.5, momentum=0.0)
    model.weight.grad, model.bias.grad = torch.zeros_like(w0), torch.zeros_like(b0)
    opt.step()
    assert torch.allclose(model.weight, w0 * (1 - 0.1 * 0.5))
    assert torch.equal(model.bias.detach(), b0)


def test_frozen_params_left_out_and_groups_passthrough():
    model = _model()
    model[0].requires_grad_(False)
    groups = param_groups(model, 0.1)
    n = sum(len(g["params"]) for g in groups)
    assert n == 4  # BN weight/bias + last Linear weight/bias
    custom = [{"params": list(model[3].parameters()), "lr_scale": 10.0}]
    opt = build_optimizer("sgd", custom, lr=0.01, weight_decay=0.0)
    assert len(opt.param_groups) == 1
    set_lr(opt, 0.02)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_set_lr_and_unknown_name():
    opt = build_optimizer("adamw", _model(), lr=1e-3, weight_decay=0.05)
    set_lr(opt, 5e-4)
    assert all(math.isclose(g["lr"], 5e-4) for g in opt.param_groups)
    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer("rmsprop", _model(), lr=0.1, weight_decay=0.0)
