"""Losses against hand-written NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysemi.ml.losses import byol_loss, consistency_loss, cross_entropy, sharpen, symmetric_byol_loss


def _np_byol(p: np.ndarray, z: np.ndarray) -> float:
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.mean(np.sum((pn - zn) ** 2, axis=1)))  # = mean(2 - 2 cos)


def test_byol_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    got = byol_loss(torch.tensor(p, dtype=torch.float32), torch.tensor(z, dtype=torch.float32))
    cos = np.sum(p * z, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))
    assert got.item() == pytest.approx(_np_byol(p, z), rel=1e-5)
    assert got.item() == pytest.approx(float(np.mean(2 - 2 * cos)), rel=1e-5)


def test_byol_loss_extremes():
    x = torch.randn(4, 8)
    assert byol_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    assert byol_loss(x, -x).item() == pytest.approx(4.0, abs=1e-6)


def test_byol_loss_no_grad_into_z():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_byol_loss_shape_check():
    with pytest.raises(ValueError):
        byol_loss(torch.randn(4, 8), torch.randn(4, 7))


def test_symmetric_byol_loss():
    rng = np.random.default_rng(1)
    t = {k: rng.normal(size=(6, 5)) for k in ("p1", "p2", "z1_t", "z2_t")}
    out = {k: torch.tensor(v, dtype=torch.float32) for k, v in t.items()}
    expected = _np_byol(t["p1"], t["z2_t"]) + _np_byol(t["p2"], t["z1_t"])
    assert symmetric_byol_loss(out).item() == pytest.approx(expected, rel=1e-5)
    worst = {"p1": out["p1"], "p2": out["p2"], "z2_t": -out["p1"], "z1_t": -out["p2"]}
    assert symmetric_byol_loss(worst).item() == pytest.approx(8.0, abs=1e-5)


def _np_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def test_cross_entropy_unweighted_matches_numpy():
    rng = np.random.default_rng(2)
    logits, y = rng.normal(size=(10, 4)), rng.integers(0, 4, 10)
    got = cross_entropy(torch.tensor(logits), torch.tensor(y))
    assert got.item() == pytest.approx(_np_ce(logits, y).mean(), rel=1e-10)


def test_cross_entropy_sample_weights_matches_numpy():
    rng = np.random.default_rng(3)
    logits, y = rng.normal(size=(10, 4)), rng.integers(0, 4, 10)
    w = rng.uniform(0, 1, 10)
    got = cross_entropy(torch.tensor(logits), torch.tensor(y), weights=torch.tensor(w))
    expected = np.sum(w * _np_ce(logits, y)) / np.sum(w)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # zero weight drops a sample: same as leaving it out
    w0 = np.ones(10)
    w0[:3] = 0
    got0 = cross_entropy(torch.tensor(logits), torch.tensor(y), weights=torch.tensor(w0))
    assert got0.item() == pytest.approx(_np_ce(logits[3:], y[3:]).mean(), rel=1e-10)


def test_cross_entropy_class_and_sample_weights():
    rng = np.random.default_rng(4)
    logits, y = rng.normal(size=(12, 3)), rng.integers(0, 3, 12)
    w, cw = rng.uniform(0.1, 1, 12), np.array([0.5, 2.0, 1.0])
    lt, yt = torch.tensor(logits), torch.tensor(y)
    got = cross_entropy(lt, yt, weights=torch.tensor(w), class_weights=torch.tensor(cw))
    expected = np.sum(w * cw[y] * _np_ce(logits, y)) / np.sum(w * cw[y])
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # unit sample weights reproduce PyTorch's own mean, also with label smoothing
    for ls in (0.0, 0.1):
        ref = F.cross_entropy(lt, yt, weight=torch.tensor(cw), label_smoothing=ls)
        ones = cross_entropy(
            lt, yt, weights=torch.ones(12), class_weights=torch.tensor(cw), label_smoothing=ls
        )
        assert ones.item() == pytest.approx(ref.item(), rel=1e-10)


def test_cross_entropy_edge_cases():
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    zero = cross_entropy(logits, y, weights=torch.zeros(4))
    assert zero.item() == 0.0
    zero.backward()  # still differentiable, no NaN
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        cross_entropy(logits, y, weights=torch.ones(3))


def test_cross_entropy_soft_targets_matches_numpy():
    # Soft targets (Noisy Student): -sum_k c_k t_ik log p_ik, weighted mean with denominator sum_i w_i sum_k c_k t_ik.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 3))
    t = rng.dirichlet(np.ones(3), size=5)
    w = np.array([1.0, 0.5, 1.0, 0.0, 2.0])
    c = np.array([0.5, 1.0, 2.0])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    per = -(t * c * logp).sum(1)
    want = float((w * per).sum() / (w * (t @ c)).sum())
    got = cross_entropy(torch.tensor(logits), torch.tensor(t), torch.tensor(w), torch.tensor(c))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # One-hot probabilities give exactly the hard-label loss.
    y = np.array([0, 2, 1, 1, 0])
    hard = cross_entropy(torch.tensor(logits), torch.tensor(y), torch.tensor(w), torch.tensor(c))
    onehot = cross_entropy(torch.tensor(logits), torch.tensor(np.eye(3)[y]), torch.tensor(w), torch.tensor(c))
    assert onehot.item() == pytest.approx(hard.item(), rel=1e-6)
    with pytest.raises(ValueError, match="logits' shape"):
        cross_entropy(torch.tensor(logits), torch.tensor(t[:, :2]))


def test_sharpen():
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    assert torch.allclose(sharpen(p, 1.0), p)
    want = np.array([0.6, 0.3, 0.1]) ** 2
    assert np.allclose(sharpen(p, 0.5).numpy()[0], want / want.sum())
    assert sharpen(p, 0.01).argmax().item() == 0 and sharpen(p, 0.01)[0, 0] > 0.999
    with pytest.raises(ValueError):
        sharpen(p, 0.0)


def test_consistency_loss_matches_numpy():
    """FixMatch eq. 4: CE of the strong view against the weak view's argmax, only above the threshold, mean over
    all rows; class weights scale a row by its pseudo-class's weight; no gradient into the teacher."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(8, 3))
    probs = rng.dirichlet([0.3, 0.3, 0.3], size=8)
    threshold, cw = 0.7, np.array([1.0, 2.0, 0.5])
    teacher, student = torch.tensor(probs, requires_grad=True), torch.tensor(logits, requires_grad=True)
    loss, mask = consistency_loss(student, teacher, threshold, torch.tensor(cw))
    keep = probs.max(1) >= threshold
    pseudo = probs.argmax(1)
    expected = np.sum(keep * cw[pseudo] * _np_ce(logits, pseudo)) / len(logits)
    assert 0 < keep.sum() < len(keep)  # the data exercise both sides of the threshold
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert mask.tolist() == keep.astype(float).tolist()
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert student.grad[~torch.tensor(keep)].abs().sum() == 0  # rows below the threshold teach nothing
    # nobody above the threshold: no loss; the shapes must agree
    none, m0 = consistency_loss(torch.tensor(logits), torch.tensor(probs), 1.01)
    assert none.item() == 0.0 and m0.sum().item() == 0.0
    with pytest.raises(ValueError):
        consistency_loss(torch.zeros(4, 3), torch.zeros(4, 2), 0.5)
