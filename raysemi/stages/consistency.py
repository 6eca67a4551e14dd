"""FixMatch's consistency training on the unlabelled pool (Sohn et al. 2020, arXiv 2001.07685): the pieces the
fine-tuning step adds when ``run.mode=fixmatch`` (or ``fixmatch.weight`` > 0 during the method's rounds).

Every optimizer step also draws ``fixmatch.ratio`` x the labelled batch of pool images (the train and
unlabelled splits), each as a weak view (the eval transform plus a flip) and a strong one (the fine-tuning
augmentation: TrivialAugment or RandAugment, FixMatch's "RA"). The teacher labels the weak views; where its
confidence reaches ``fixmatch.threshold`` the student learns that class on the strong view. The teacher is the
student itself in eval mode, without gradients (FixMatch's own choice: the pseudo-label follows the model step
by step), or its EMA with ``fixmatch.ema_teacher`` (a mean teacher). The labelled rows and the strong views go
through the student in one forward, so that its batch norm sees them together, as in FixMatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysemi.core.config import Config
from raysemi.data.loading.loader import build_loader
from raysemi.ml.compute import Compute
from raysemi.ml.losses import consistency_loss


@dataclass(frozen=True)
class PoolSet:
    """The pool shards the consistency term reads (every train and unlabelled shard of the data set)."""

    uris: list[str]
    rows: list[int]  # per shard


def pool_stream(pool: PoolSet, cfg: Config, batch: int, rank: int, world: int, device: torch.device,
                step: int, total_steps: int):
    """This rank's pair batches of the pool (``fixmatch.ratio`` x its labelled ``batch``), one per step from
    ``step`` to ``total_steps``, from a loader of its own (seeded apart from the labelled one)."""
    loader = build_loader(
        pool.uris, mode="pair", size=cfg.data.image_size, batch_size=batch * cfg.fixmatch.ratio,
        augment=cfg.augment, rank=rank, world_size=world, seed=cfg.finetune.seed + 1, backend=cfg.data.loader,
        device=device, num_threads=cfg.data.num_threads, shard_rows=pool.rows,
        decode_cache_mb=cfg.data.decode_cache_mb,
    )
    return loader.stream(step, total_steps)


@torch.no_grad()
def teacher_probs(teacher: nn.Module, weak: torch.Tensor, compute: Compute) -> torch.Tensor:
    """The teacher's class probabilities for the weak views: eval mode (running batch-norm statistics), no
    gradients; the teacher's train/eval mode is restored afterwards."""
    was_training = teacher.training
    teacher.eval()
    try:
        with compute.autocast():
            logits = teacher(compute.images(weak))
    finally:
        teacher.train(was_training)
    return torch.softmax(logits.float(), dim=1)


def consistency_term(strong_logits: torch.Tensor, probs: torch.Tensor, weight: float, threshold: float,
                     class_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` x FixMatch's loss of the strong views' logits against the teacher's ``probs``, and the mask of
    the rows that counted."""
    loss, mask = consistency_loss(strong_logits.float(), probs, threshold, class_weights)
    return weight * loss, mask


class PoolStats:
    """Sums over an interval, on the device: pool images seen, rows above the threshold and, where the pool's
    stored labels are known (a few-label simulation), how many of those the teacher labelled right."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # seen, masked, known, correct, loss

    def add(self, loss: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        keep, truth = mask > 0, labels >= 0
        self.sums += torch.stack([
            torch.tensor(float(mask.numel()), dtype=torch.float64, device=mask.device),
            keep.sum().double(), (keep & truth).sum().double(),
            ((probs.argmax(1) == labels) & keep & truth).sum().double(), loss.detach().double(),
        ])

    def totals(self) -> list[float]:
        return self.sums.tolist()

    @staticmethod
    def metrics(totals: list[float], steps: float) -> dict[str, Any]:
        """``pool_*`` metrics from summed ``totals()`` (over ranks) and the number of steps they cover."""
        seen, masked, known, correct, loss = totals
        return {
            "pool_images_seen": seen,
            "pool_mask_rate": masked / seen if seen else 0.0,  # share of pool rows above the threshold
            "pool_pseudo_accuracy": correct / known if known else None,  # of those, right (hidden labels)
            "consistency_loss": loss / steps if steps else 0.0,
        }
