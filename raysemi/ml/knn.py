"""kNN classifier on frozen features: the representation monitor of pretraining.

Weighted kNN of Wu et al. 2018 (InstDisc), the standard self-supervised monitor (lightly's
``knn_predict``): cosine similarity on L2-normalised features, the k nearest bank entries vote with
weight ``exp(sim / T)``. With ``temperature=None`` every neighbour votes 1 (plain majority vote, what
scikit-learn's ``KNeighborsClassifier(metric="cosine")`` computes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float | None = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class of each query row (``(Q,)`` int64) from a labelled feature bank ``(N, D)``."""
    if bank.shape[0] == 0:
        raise ValueError("kNN bank is empty")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    preds = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sim = q @ bank.T  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        top_labels = bank_labels[top_idx]  # (q, k)
        weights = torch.ones_like(top_sim) if temperature is None else (top_sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, top_labels, weights)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, num_classes: int, k: int = 20
) -> float:
    pred = knn_predict(bank, bank_labels, queries, num_classes, k)
    return float((pred == query_labels).float().mean())
