"""The cross-field checks of the config tree (``validate``) and ``ConfigError``: what the types alone of
:mod:`raysemi.core.config` cannot express, checked once when a config is built, each failure one line naming
the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysemi.core.errors import RaysemiError

if TYPE_CHECKING:
    from raysemi.core.config import Config


class ConfigError(RaysemiError):
    """A configuration problem, reported as one line naming the key."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    d, p, f, pl, r = cfg.data, cfg.pretrain, cfg.finetune, cfg.pseudolabel, cfg.ray
    _check(16 <= d.image_size <= 1024, f"data.image_size: {d.image_size} is outside [16, 1024]")
    _check(d.num_threads >= 1, "data.num_threads: must be >= 1")
    _check(d.decode_cache_mb >= 0, "data.decode_cache_mb: must be >= 0 (0 = off)")
    _check(
        d.label_fraction is None or 0.0 < d.label_fraction <= 1.0,
        f"data.label_fraction: {d.label_fraction} is outside (0, 1]",
    )
    _check(d.labels_per_class is None or d.labels_per_class >= 1, "data.labels_per_class: must be >= 1")
    _check(
        d.label_fraction is None or d.labels_per_class is None,
        "data.label_fraction and data.labels_per_class: set at most one",
    )
    a = cfg.augment
    _check(0.0 < a.crop_scale[0] <= a.crop_scale[1] <= 1.0, f"augment.crop_scale: {a.crop_scale} is not in (0, 1]")
    for name in ("hflip_p", "jitter_p", "grey_p"):
        v = getattr(a, name)
        _check(0.0 <= v <= 1.0, f"augment.{name}: {v} is not a probability")
    _check(
        0.0 < a.finetune_crop_scale[0] <= a.finetune_crop_scale[1] <= 1.0,
        f"augment.finetune_crop_scale: {a.finetune_crop_scale} is not in (0, 1]",
    )
    for name in ("blur_p", "solarize_p"):
        for v in getattr(a, name):
            _check(0.0 <= v <= 1.0, f"augment.{name}: {v} is not a probability")
    _check(all(s > 0 for s in a.std), "augment.std: must be positive")
    m = cfg.model
    for name in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
        _check(getattr(m, name) >= 1, f"model.{name}: must be >= 1")
    for stage, s in (("pretrain", p), ("finetune", f)):
        _check(s.epochs >= 1, f"{stage}.epochs: must be >= 1")
        _check(s.batch_size >= 1, f"{stage}.batch_size: must be >= 1")
        _check(s.lr > 0, f"{stage}.lr: must be > 0")
        _check(s.weight_decay >= 0, f"{stage}.weight_decay: must be >= 0")
        _check(
            0 <= s.warmup_epochs <= s.epochs,
            f"{stage}.warmup_epochs: {s.warmup_epochs} is outside [0, {stage}.epochs={s.epochs}]",
        )
        _check(
            s.batch_size >= r.num_workers,
            f"{stage}.batch_size: {s.batch_size} is smaller than ray.num_workers ({r.num_workers})",
        )
    _check(0.0 <= p.tau_base < 1.0, f"pretrain.tau_base: {p.tau_base} is outside [0, 1)")
    _check(p.checkpoint_every >= 1, "pretrain.checkpoint_every: must be >= 1")
    _check(f.checkpoint_every >= 1, "finetune.checkpoint_every: must be >= 1")
    _check(p.knn_every >= 0 and p.knn_k >= 1, "pretrain.knn_every must be >= 0 and pretrain.knn_k >= 1")
    _check(f.steps is None or f.steps >= 1, "finetune.steps: must be >= 1 (or null to count in epochs)")
    _check(f.eval_every >= 1, "finetune.eval_every: must be >= 1")
    _check(f.warmup_steps >= 0, "finetune.warmup_steps: must be >= 0")
    _check(0.0 <= f.ema_decay < 1.0, f"finetune.ema_decay: {f.ema_decay} is outside [0, 1)")
    _check(0.0 <= f.dropout < 1.0, "finetune.dropout: must be in [0, 1)")
    _check(0.0 <= f.drop_path_rate < 1.0, "finetune.drop_path_rate: must be in [0, 1)")
    _check(0.0 < f.backbone_lr_scale <= 1.0, "finetune.backbone_lr_scale: must be in (0, 1]")
    _check(pl.temperature > 0, "pseudolabel.temperature: must be > 0")
    _check(0.0 <= pl.labeled_share < 1.0, "pseudolabel.labeled_share: must be in [0, 1)")
    _check(pl.retrain_lr_scale > 0, "pseudolabel.retrain_lr_scale: must be > 0")
    _check(f.pseudo_weight > 0, "finetune.pseudo_weight: must be > 0")
    _check(0.0 <= f.label_smoothing < 1.0, "finetune.label_smoothing: must be in [0, 1)")
    _check(pl.rounds >= 0, "pseudolabel.rounds: must be >= 0")
    _check(
        0.0 < pl.budget <= 1.0 or (pl.budget > 1.0 and pl.budget == int(pl.budget)),
        f"pseudolabel.budget: {pl.budget} is neither a fraction in (0, 1] nor a whole number of images",
    )
    _check(0.0 <= pl.min_confidence <= 1.0, "pseudolabel.min_confidence: must be in [0, 1]")
    _check(pl.num_actors >= 1 and pl.batch_size >= 1, "pseudolabel.num_actors and batch_size must be >= 1")
    _check(pl.cpus_per_actor > 0 or pl.gpus_per_actor > 0, "pseudolabel: an actor needs CPUs or GPUs")
    _check(r.num_workers >= 1, "ray.num_workers: must be >= 1")
    _check(r.min_workers is None or 1 <= r.min_workers <= r.num_workers,
           f"ray.min_workers: {r.min_workers} is not between 1 and ray.num_workers ({r.num_workers})")
    _check(r.resize_interval_s >= 0, "ray.resize_interval_s: must be >= 0")
    _check(r.collective_timeout_s >= 1, "ray.collective_timeout_s: must be >= 1 (seconds)")
    # PyTorch's SyncBatchNorm runs on CUDA only; on CPU workers each rank normalises its own half-batch.
    _check(r.use_gpu or not m.sync_batchnorm, "model.sync_batchnorm: needs ray.use_gpu=true (CUDA only)")
    _check(r.cpus_per_worker > 0, "ray.cpus_per_worker: must be > 0")
    _check(r.max_failures >= 0, "ray.max_failures: must be >= 0")
