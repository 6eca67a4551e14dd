"""Forward passes over an eval loader: class probabilities of a classifier, features of a frozen backbone.

Shared by the training stages (validation during fine-tuning, the kNN monitor of pretraining) and by the
stages that only read a model (evaluation, the kNN probe).
"""

from __future__ import annotations

import numpy as np
import torch

from raysemi.stages.common import autocast


@torch.no_grad()
def predict_probs(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32"):
    """Ids, labels (-1 = none) and softmax probabilities of every row the eval loader yields."""
    model.eval()
    ids, labels, probs = [], [], []
    for batch in loader:
        with autocast(device, precision):
            logits = model(batch["image"])
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
        ids += list(batch["id"])
    if not probs:
        return [], np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return ids, torch.cat(labels).numpy(), torch.cat(probs).numpy()


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features and labels (-1 = unlabelled) of every row the loader yields."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for batch in loader:
        feats.append(backbone(batch["image"]).float().cpu())
        labels.append(batch["label"].cpu())
    backbone.train(was_training)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
