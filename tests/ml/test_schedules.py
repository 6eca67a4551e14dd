"""Schedules: exact values at the ends, monotonicity, argument checks."""

from __future__ import annotations

import itertools
import math

import pytest

from raysemi.ml.schedules import byol_tau, cosine_schedule, scale_lr, warmup_cosine_lr


def test_byol_tau_ends_and_monotonic():
    assert byol_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert byol_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert byol_tau(50, 100, 0.99) == pytest.approx(0.995)  # cos(pi/2) = 0: halfway
    # the paper's formula at an arbitrary step
    assert byol_tau(30, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2)
    values = [byol_tau(s, 100) for s in range(101)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert byol_tau(150, 100) == pytest.approx(1.0)  # held past the end


def test_cosine_schedule():
    assert cosine_schedule(0, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_schedule(10, 10, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine_schedule(5, 10, 2.0, 0.0) == pytest.approx(1.0)


def test_warmup_cosine_lr():
    base, final, total, warm = 0.1, 0.001, 100, 10
    lrs = [warmup_cosine_lr(s, total, warm, base, final) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(base / warm)  # ~0, not exactly 0
    assert lrs[warm - 1] == pytest.approx(base)
    assert lrs[warm] == pytest.approx(base)  # warmup end
    assert lrs[total] == pytest.approx(final)
    assert all(b > a for a, b in itertools.pairwise(lrs[:warm]))  # increasing warmup
    assert all(b <= a for a, b in itertools.pairwise(lrs[warm:]))  # decaying after
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(final + (base - final) / 2)
    assert warmup_cosine_lr(0, 10, 0, 0.5) == pytest.approx(0.5)  # no warmup
    # warmup over the whole run (the config allows warmup_epochs == epochs)
    assert warmup_cosine_lr(9, 10, 10, 0.5) == pytest.approx(0.5)
    assert warmup_cosine_lr(10, 10, 10, 0.5, 0.01) == pytest.approx(0.01)


def test_scale_lr():
    assert scale_lr(0.2, 4096) == pytest.approx(3.2)
    assert scale_lr(0.03, 128) == pytest.approx(0.015)
    assert scale_lr(0.1, 64, reference=64) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        scale_lr(0.1, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: byol_tau(0, 0),
        lambda: byol_tau(-1, 10),
        lambda: byol_tau(0, 10, tau_base=1.5),
        lambda: warmup_cosine_lr(0, 0, 0, 0.1),
        lambda: warmup_cosine_lr(-1, 10, 2, 0.1),
        lambda: warmup_cosine_lr(0, 10, 11, 0.1),
        lambda: cosine_schedule(0, -5, 1.0, 0.0),
    ],
)
def test_invalid_args(call):
    with pytest.raises(ValueError):
        call()
