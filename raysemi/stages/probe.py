"""Frozen-feature kNN of pretrained backbones against the same backbone at random init: ``raysemi knn``.

This is the check that pretraining learned something, without a fine-tune: the labelled ``train`` rows
(all of them, the usual kNN protocol, not the few-label subset) form the feature bank, the rows of
``--split`` are the queries, and each query takes the weighted vote of its ``pretrain.knn_k`` nearest
neighbours (:mod:`raysemi.ml.knn`, the same monitor pretraining reports). The random-init row uses the
backbone that pretraining starts from (``torch.manual_seed(pretrain.seed)``), so the difference between
the rows is what pretraining added. Runs in this process, no Ray: the eval transform of ``data.loader``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raysemi.core.config import Config
from raysemi.core.errors import RaysemiError
from raysemi.core.tables import markdown_table
from raysemi.data.loading.loader import build_loader
from raysemi.data.shards import read_manifest
from raysemi.ml.compute import compute_for
from raysemi.ml.knn import knn_accuracy
from raysemi.models.backbone import backbone_for
from raysemi.models.checkpoint import backbone_from_byol
from raysemi.stages.inference import extract_features

log = logging.getLogger("raysemi.probe")

RANDOM_INIT = "random init"


def random_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone pretraining starts from: same architecture, same seed."""
    torch.manual_seed(cfg.pretrain.seed)
    return backbone_for(cfg.model)


def _features(cfg: Config, backbone: torch.nn.Module, uris: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    loader = build_loader(
        uris, mode="eval", size=cfg.data.image_size, batch_size=128, augment=cfg.augment,
        backend=cfg.data.loader, device=torch.device("cpu"), num_threads=cfg.data.num_threads,
    )
    compute = compute_for(torch.device("cpu"), cfg.pretrain.precision, cfg.pretrain.channels_last)
    feats, labels = extract_features(compute.model(backbone.eval()), loader, compute)
    keep = labels >= 0
    return feats[keep], labels[keep]


def knn_table(cfg: Config, weights: list[str], split: str = "test") -> list[dict[str, Any]]:
    """kNN accuracy on ``split`` of the random-init backbone and of every BYOL file in ``weights``."""
    manifest = read_manifest(cfg.data.path)
    for needed in ("train", split):
        if needed not in manifest.splits or manifest.splits[needed].labeled == 0:
            raise RaysemiError(f"dataset {cfg.data.path} has no labelled {needed!r} split for the kNN probe")
    bank_uris = manifest.shard_uris(cfg.data.path, "train")
    query_uris = manifest.shard_uris(cfg.data.path, split)
    # Load every file first: a wrong one fails before minutes of feature extraction.
    models = [(RANDOM_INIT, random_backbone(cfg))] + [(w, backbone_from_byol(cfg, w)) for w in weights]
    rows = []
    for name, backbone in models:
        bank, bank_y = _features(cfg, backbone, bank_uris)
        query, query_y = _features(cfg, backbone, query_uris)
        acc = knn_accuracy(bank, bank_y, query, query_y, manifest.num_classes, cfg.pretrain.knn_k)
        log.info("kNN %s: %.4f", name, acc)
        rows.append({"weights": name, "split": split, "k": cfg.pretrain.knn_k, "bank": len(bank),
                     "queries": len(query), "knn_accuracy": acc})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The probe's rows as a Markdown table."""
    cells = ([r["weights"], r["split"], r["bank"], r["queries"], r["k"], f"{r['knn_accuracy']:.4f}"] for r in rows)
    return "\n".join(markdown_table(["weights", "split", "bank", "queries", "k", "kNN accuracy"], cells,
                                     align="llrrrr"))
