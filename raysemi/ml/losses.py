"""Losses: BYOL's normalised-MSE, cross-entropy with optional per-sample (pseudo-label) weights, and
FixMatch's thresholded consistency loss on unlabelled images."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the batch of ``2 - 2 * cos(p, z)``, gradients only through ``p``.

    Grill et al. 2020, eq. 2: ``||p/|p| - z/|z|||^2 = 2 - 2 cos``; lightly's
    ``NegativeCosineSimilarity`` up to the affine map. Range [0, 4] per pair. ``z`` is the target
    projection and is detached here so no gradient reaches the target even if the caller forgot.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(
            f"expected two (B, D) tensors of one shape, got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    # float32 for the normalisation: under autocast, fp16 norms of 256-d vectors lose precision.
    p_n = F.normalize(p.float(), dim=-1)
    z_n = F.normalize(z.detach().float(), dim=-1)
    return (2.0 - 2.0 * (p_n * z_n).sum(dim=-1)).mean()


def symmetric_byol_loss(out: Mapping[str, Tensor]) -> Tensor:
    """BYOL's symmetrised loss (Grill et al. 2020, sec. 3.1): each view predicts the other's target.

    ``out`` is ``byol_forward``'s dict; the result lies in [0, 8].
    """
    return byol_loss(out["p1"], out["z2_t"]) + byol_loss(out["p2"], out["z1_t"])


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy (method paper eq. 3) with optional per-sample and per-class weights.

    ``targets`` are class indices ``(B,)`` or class probabilities ``(B, C)`` (soft pseudo-labels, as in
    Noisy Student, Xie et al. 2020, arXiv 1911.04252). With per-sample loss ``l_i``
    (``F.cross_entropy(..., reduction="none")``, which already includes the class weights: ``c_{y_i}``, or
    ``sum_k c_k t_ik`` for probabilities), the result is the weighted mean
    ``sum_i w_i * l_i / sum_i w_i * c(t_i)`` with ``c(t_i) = c_{y_i}`` or ``sum_k c_k t_ik``,
    ``w_i = weights[i]`` (e.g. 1 for true labels and less for pseudo-labels; default 1) and
    ``c = class_weights`` (default 1). For hard targets without ``weights`` this equals
    ``F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=...)``. Weights must be
    non-negative (not checked: a check would sync the GPU). All-zero weights give 0.
    """
    soft = targets.ndim == 2
    if soft and targets.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if weights is None and not soft:
        return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)
    n = targets.shape[0]
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    per_sample = F.cross_entropy(
        logits, targets, weight=class_weights, reduction="none", label_smoothing=label_smoothing
    )
    w = torch.ones_like(per_sample) if weights is None else weights.to(per_sample.dtype)
    if class_weights is None:
        denom_w = w
    else:
        cw = class_weights.to(per_sample.dtype)
        denom_w = w * (targets.to(per_sample.dtype) @ cw if soft else cw[targets])
    # clamp: an all-zero-weight batch gives 0 / tiny = 0 instead of NaN.
    return (w * per_sample).sum() / denom_w.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)


def consistency_loss(strong_logits: Tensor, teacher_probs: Tensor, threshold: float,
                     class_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FixMatch's unlabelled loss (Sohn et al. 2020, arXiv 2001.07685, eq. 4): the cross-entropy of the strong
    view's logits against the teacher's class on the weak view, for the rows where the teacher's confidence is
    at least ``threshold``, averaged over *all* rows (so the term grows as the teacher grows sure of more of
    the pool). ``class_weights`` scales a row by the weight of its pseudo-class, as the labelled loss does.
    Returns ``(loss, mask)``; ``mask`` (float, 1 = the row counted) is for monitoring."""
    if strong_logits.shape != teacher_probs.shape or strong_logits.ndim != 2:
        raise ValueError(f"expected two (B, C) tensors of one shape, got {tuple(strong_logits.shape)} and "
                         f"{tuple(teacher_probs.shape)}")
    confidence, pseudo = teacher_probs.detach().max(dim=1)
    mask = (confidence >= threshold).to(strong_logits.dtype)
    per_row = F.cross_entropy(strong_logits, pseudo, weight=class_weights, reduction="none")
    return (per_row * mask).mean(), mask


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """``p^(1/T)`` renormalised per row: the teacher's soft targets at temperature ``T`` (< 1 sharpens)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log(probs.clamp_min(1e-12)) / temperature
    return torch.softmax(logp, dim=-1)
