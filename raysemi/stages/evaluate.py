"""Evaluation: a classifier's predictions on a split, the metrics, and ``raysemi evaluate``.

Prediction and metrics run as one Ray task (with a GPU when ``ray.use_gpu``), so a driver on a CPU head node
neither does the inference nor holds a row's probabilities: the task returns the metrics. Val/test splits are
small next to the unlabelled pool, which goes through the actor pool of ``stages.pseudolabel`` instead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysemi.core.config import Config
from raysemi.core.errors import RaysemiError
from raysemi.core.io import filesystem, is_remote, join, write_bytes_atomic
from raysemi.data.loading.loader import build_loader
from raysemi.data.shards import read_manifest
from raysemi.distributed import ray_session, ray_utils
from raysemi.ml.compute import compute_for
from raysemi.ml.metrics import classification_metrics
from raysemi.ml.report import write_report
from raysemi.models.checkpoint import load_classifier
from raysemi.stages.inference import predict_probs


def predict_split_local(model_uri: str, cfg: Config, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, labels (-1 = none) and probabilities of ``split``, in this process."""
    import torch

    device = ray_utils.get_device()
    compute = compute_for(device, cfg.finetune.precision, cfg.finetune.channels_last)
    model, _, _ = load_classifier(model_uri, device)
    compute.model(model)
    manifest = read_manifest(cfg.data.path)
    loader = build_loader(
        manifest.shard_uris(cfg.data.path, split), mode="eval", size=cfg.data.image_size,
        batch_size=cfg.pseudolabel.batch_size, augment=cfg.augment, backend=cfg.data.loader, device=device,
        num_threads=cfg.data.num_threads,
    )
    with torch.inference_mode():
        return predict_probs(model, loader, compute)


def split_metrics_local(model_uri: str, cfg: Config, split: str, classes: list[str]) -> dict[str, Any]:
    """The metrics of ``split`` (its labelled rows), computed where its predictions are: only the summary
    (counts, curves' points, scores) leaves the process, never a row's probabilities."""
    _, y, probs = predict_split_local(model_uri, cfg, split)
    keep = y >= 0
    if not keep.any():
        raise RaysemiError(f"split {split!r} of {cfg.data.path} has no labelled rows to evaluate on")
    return classification_metrics(y[keep], probs[keep], classes)


def split_metrics(model_uri: str, cfg: Config, split: str, classes: list[str]) -> dict[str, Any]:
    """``split_metrics_local`` as a Ray task on a worker with the configured resources."""
    import ray

    ray_session.init_ray(cfg.ray.address)
    task = ray.remote(split_metrics_local).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0, **ray_utils.OUTSIDE_PLACEMENT_GROUP
    )
    try:
        return ray.get(task.remote(model_uri, cfg, split, classes))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, RaysemiError):
            raise err.cause from None
        raise


def publish_report(report: dict[str, Any], out_dir: str) -> str:
    """Write report.json/.md and plots to ``out_dir`` (local or s3://); report.json last. Returns its URI."""
    if not is_remote(out_dir):
        write_report(report, Path(out_dir))
        return str(Path(out_dir) / "report.json")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_report(report, Path(tmp))
        ordered = sorted(paths.values(), key=lambda p: p.name == "report.json")
        for p in ordered:
            write_bytes_atomic(join(out_dir, p.name), p.read_bytes())
    return join(out_dir, "report.json")


def run(cfg: Config, model_uri: str, split: str = "test") -> str:
    """``raysemi evaluate``: metrics of a saved classifier on one split, as a report in run.output_dir."""
    fs, path = filesystem(model_uri)
    if not fs.exists(path):
        raise RaysemiError(f"model {model_uri} does not exist")
    manifest = read_manifest(cfg.data.path)
    if split not in manifest.splits:
        raise RaysemiError(f"dataset {cfg.data.path} has no split {split!r}")
    _, _, classes = load_classifier(model_uri)
    if len(classes) != manifest.num_classes:
        raise RaysemiError(f"{model_uri} predicts {len(classes)} classes, the dataset has {manifest.num_classes}")
    t0 = time.time()
    metrics = split_metrics(model_uri, cfg, split, manifest.classes)
    report = {
        "run": {"name": cfg.run.name, "mode": "evaluate", "head": cfg.model.head, "dataset": cfg.data.path,
                "backbone": cfg.model.backbone, "model": model_uri, "split": split},
        "classes": manifest.classes,
        "stages": {"evaluate": time.time() - t0},
        "test": metrics,
    }
    return publish_report(report, join(cfg.run.output_dir, f"evaluate-{split}"))
