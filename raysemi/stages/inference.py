"""Forward passes over an eval loader: class probabilities of a classifier, features of a frozen backbone.

Shared by the training stages (validation during fine-tuning, the kNN monitor of pretraining) and by the
stages that only read a model (evaluation, the kNN probe). ``compute`` (``raysemi.ml.compute``) sets the autocast
precision and the image layout; without it, fp32 in the stored layout.
"""

from __future__ import annotations

import numpy as np
import torch

from raysemi.ml.compute import Compute

FP32 = Compute(torch.device("cpu"))  # fp32 in the stored layout (autocast off on any device)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader, compute: Compute | None = None):
    """Ids, labels (-1 = none) and softmax probabilities of every row the eval loader yields."""
    compute = compute or FP32
    model.eval()
    ids, labels, probs = [], [], []
    for batch in loader:
        with compute.autocast():
            logits = model(compute.images(batch["image"]))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
        ids += list(batch["id"])
    if not probs:
        return [], np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return ids, torch.cat(labels).numpy(), torch.cat(probs).numpy()


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, compute: Compute | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features and labels (-1 = unlabelled) of every row the loader yields."""
    compute = compute or FP32
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for batch in loader:
        with compute.autocast():
            feats.append(backbone(compute.images(batch["image"])).float().cpu())
        labels.append(batch["label"].cpu())
    backbone.train(was_training)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
