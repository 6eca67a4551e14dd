"""Losses: BYOL's normalised-MSE and cross-entropy with optional per-sample (pseudo-label) weights."""

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

    With per-sample loss ``l_i`` (``F.cross_entropy(..., reduction="none")``, which already includes
    ``class_weights[y_i]``), the result is the weighted mean
    ``sum_i w_i * l_i / sum_i w_i * c_{y_i}``, with ``w_i = weights[i]`` (e.g. 1 for true labels and
    the confidence for pseudo-labels; default 1) and ``c = class_weights`` (default 1). Without
    ``weights`` this equals ``F.cross_entropy(logits, targets, weight=class_weights,
    label_smoothing=...)``. Weights must be non-negative (not checked: a check would sync the GPU).
    All-zero weights give 0.
    """
    if weights is None:
        return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)
    if weights.shape != targets.shape:
        raise ValueError(
            f"weights must have the shape of targets {tuple(targets.shape)}, got {tuple(weights.shape)}"
        )
    per_sample = F.cross_entropy(
        logits, targets, weight=class_weights, reduction="none", label_smoothing=label_smoothing
    )
    w = weights.to(per_sample.dtype)
    denom_w = w if class_weights is None else w * class_weights.to(per_sample.dtype)[targets]
    # clamp: an all-zero-weight batch gives 0 / tiny = 0 instead of NaN.
    return (w * per_sample).sum() / denom_w.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)
