"""BYOL pretraining: builder, ``train_one_epoch``, the kNN monitor, the Ray Train worker and ``run``.

Every image of the ``train`` and ``unlabeled`` splits is used, labels ignored (val/test stay unseen, so
pretraining cannot leak them). The online network is DDP-wrapped, the EMA target is not (it has no
gradients; every rank computes the same EMA from the synchronised online weights). Output, under
``<run.output_dir>/pretrain/``: ``byol.safetensors`` (online + target weights, the config in its metadata),
``metrics.json`` (one row per epoch) and ``config.yaml``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import timm
import torch

from raysemi.core import io as rio
from raysemi.core.config import Config, config_from_yaml, config_to_yaml, from_dict
from raysemi.core.console import StageClock
from raysemi.core.errors import RaysemiError
from raysemi.core.event_log import EventLog, clear_events
from raysemi.core.io import join, read_json, write_bytes_atomic, write_json
from raysemi.core.outputs import guard_output
from raysemi.data.loading.loader import build_loader
from raysemi.data.shards import DatasetError, Manifest, read_manifest, split_batch, steps_per_epoch
from raysemi.distributed import ray_utils
from raysemi.ml.compute import Compute, compute_for
from raysemi.ml.knn import knn_accuracy
from raysemi.ml.losses import symmetric_byol_loss
from raysemi.ml.optim import build_optimizer, set_lr
from raysemi.ml.schedules import byol_tau, scale_lr, warmup_cosine_lr
from raysemi.models.backbone import backbone_for
from raysemi.models.byol import BYOL, byol_forward
from raysemi.stages.common import StepTimer, all_reduce_sum, wrap_ddp
from raysemi.stages.inference import extract_features
from raysemi.stages.worker import TrainState, build_replica, use_threads

log = logging.getLogger("raysemi.pretrain")

WEIGHTS = "byol.safetensors"
PRETRAIN_SPLITS = ("train", "unlabeled")
KNN_MAX_ROWS = 10_000  # per side (bank / queries): the monitor must stay cheap on big data sets


@dataclass(frozen=True)
class PretrainResult:
    weights: str  # URI of byol.safetensors
    metrics: list[dict[str, Any]]
    output_dir: str


# ---------------------------------------------------------------- builders


def build_byol(cfg: Config) -> BYOL:
    m = cfg.model
    backbone = backbone_for(m)
    return BYOL(backbone, None, m.proj_hidden_dim, m.proj_dim, m.pred_hidden_dim)


def pretrain_shards(manifest: Manifest, root: str) -> tuple[list[str], list[int]]:
    uris, rows = [], []
    for split in PRETRAIN_SPLITS:
        if split in manifest.splits:
            uris += manifest.shard_uris(root, split)
            rows += [s.rows for s in manifest.splits[split].shards]
    return uris, rows


def _monitor_shards(manifest: Manifest, root: str, split: str) -> list[str]:
    """The first shards of ``split`` up to ``KNN_MAX_ROWS`` rows (deterministic, cheap)."""
    if split not in manifest.splits:
        return []
    uris, total = [], 0
    for shard, uri in zip(manifest.splits[split].shards, manifest.shard_uris(root, split)):
        if total >= KNN_MAX_ROWS:
            break
        uris.append(uri)
        total += shard.rows
    return uris


def check_inputs(cfg: Config) -> Manifest:
    """Everything that can be wrong with the inputs, found before any worker starts."""
    if not timm.is_model(cfg.model.backbone):
        raise RaysemiError(f"model.backbone: unknown timm model {cfg.model.backbone!r}")
    manifest = read_manifest(cfg.data.path)
    uris, rows = pretrain_shards(manifest, cfg.data.path)
    if sum(rows) == 0:
        raise DatasetError(f"dataset {cfg.data.path} has no images in its train/unlabeled splits")
    workers = cfg.ray.num_workers
    if len(uris) < workers:
        raise DatasetError(
            f"ray.num_workers={workers} is more than the {len(uris)} shards of {cfg.data.path}: "
            "use fewer workers or re-ingest with --min-shards"
        )
    steps_per_epoch(rows, workers, split_batch(cfg.pretrain.batch_size, workers))
    return manifest


# ---------------------------------------------------------------- one step, one epoch


def byol_step(
    model: BYOL,
    online: torch.nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    tau: float,
    compute: Compute,
) -> torch.Tensor:
    """One BYOL update: symmetric loss through ``online`` (DDP-wrapped or not), optimizer step, EMA.

    Returns the loss as a detached tensor on the device: reading it (``.item()``) would wait for the device
    at every step, so the caller sums it and reads the sum once per epoch."""
    x1, x2 = compute.images(x1), compute.images(x2)
    with compute.autocast():
        out = byol_forward(online, model.target, x1, x2)
    loss = symmetric_byol_loss({k: v.float() for k, v in out.items()})
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.update_target(tau)
    return loss.detach()


def train_one_epoch(
    model: BYOL,
    online: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    *,
    epoch: int,
    total_steps: int,
    lr_peak: float,
    compute: Compute,
) -> dict[str, float]:
    """One pass over this rank's shards; lr and tau are set from the global step before each update."""
    p = cfg.pretrain
    steps = len(loader)
    warmup_steps = p.warmup_epochs * steps
    model.train()
    timer = StepTimer()
    loss_sum, n = torch.zeros((), device=compute.device), 0
    lr = tau = 0.0
    for i, batch in enumerate(timer.batches(loader)):
        step = epoch * steps + i
        lr = warmup_cosine_lr(step, total_steps, warmup_steps, lr_peak)
        set_lr(optimizer, lr)
        # tau follows the step *after* the update: 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (BYOL).
        tau = byol_tau(step + 1, total_steps, p.tau_base)
        loss_sum += byol_step(model, online, batch["view1"], batch["view2"], optimizer, scaler, tau, compute)
        n += 1
        timer.images += batch["view1"].shape[0]
    timer.stop()
    loss_tot, n_tot, img_tot = all_reduce_sum([float(loss_sum), n, timer.images], compute.device)
    world = ray_utils.world_size()
    return {
        "epoch": epoch,
        "loss": loss_tot / max(n_tot, 1),
        "lr": lr,
        "tau": tau,
        "images_per_s_worker": timer.images / timer.total if timer.total else 0.0,
        "images_per_s_total": img_tot / timer.total if timer.total else 0.0,
        "data_wait_fraction": timer.data_wait_fraction,
        "epoch_seconds": timer.total,
        "workers": world,
        **compute.describe(),
    }


def knn_monitor(backbone: torch.nn.Module, bank_loader, query_loader, num_classes: int, k: int,
                compute: Compute | None = None) -> float | None:
    """kNN accuracy of frozen features: labelled train rows as the bank, val rows as queries."""
    bank, bank_y = extract_features(backbone, bank_loader, compute)
    query, query_y = extract_features(backbone, query_loader, compute)
    bank, bank_y = bank[bank_y >= 0], bank_y[bank_y >= 0]
    query, query_y = query[query_y >= 0], query_y[query_y >= 0]
    if len(bank) == 0 or len(query) == 0:
        return None
    return knn_accuracy(bank, bank_y, query, query_y, num_classes, k)


# ---------------------------------------------------------------- the Ray Train worker


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: a thin adapter from Ray (rank, device, checkpoints) to the functions above."""
    cfg = from_dict(loop_config["cfg"])
    p = cfg.pretrain
    device = ray_utils.get_device()
    rank, world = ray_utils.world_rank(), ray_utils.world_size()
    manifest = read_manifest(cfg.data.path)
    uris, rows = pretrain_shards(manifest, cfg.data.path)
    batch = split_batch(p.batch_size, world)

    use_threads(cfg.ray.torch_threads)
    # SyncBatchNorm in the online and target networks alike.
    compute = compute_for(device, p.precision, p.channels_last)
    model = compute.model(build_replica(lambda: build_byol(cfg), p.seed, cfg.model.sync_batchnorm, device))
    online = wrap_ddp(model.online, device)
    if p.compile:  # in place: the state dict keeps its keys
        online.compile()
        model.target.compile()
    lr_peak = scale_lr(p.lr, batch * world)
    optimizer = build_optimizer(p.optimizer, model.online, lr_peak, p.weight_decay)
    train_state = TrainState(model, optimizer, compute.grad_scaler())
    scaler = train_state.scaler

    start_epoch, history = 0, []
    state = train_state.restore(device)
    if state is not None:
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        log.info("rank %d resumed from the checkpoint of epoch %d", rank, start_epoch - 1)

    loader = build_loader(
        uris, mode="byol", size=cfg.data.image_size, batch_size=batch, augment=cfg.augment, rank=rank,
        world_size=world, seed=p.seed, backend=cfg.data.loader, device=device,
        num_threads=cfg.data.num_threads, shard_rows=rows, decode_cache_mb=cfg.data.decode_cache_mb,
    )
    total_steps = p.epochs * len(loader)
    monitor = None
    if rank == 0 and p.knn_every:
        eval_kw = dict(mode="eval", size=cfg.data.image_size, batch_size=max(batch, 64), augment=cfg.augment,
                       backend=cfg.data.loader, device=device, num_threads=cfg.data.num_threads,
                       decode_cache_mb=cfg.data.decode_cache_mb)
        bank_uris = _monitor_shards(manifest, cfg.data.path, "train")
        query_uris = _monitor_shards(manifest, cfg.data.path, "val")
        if bank_uris and query_uris:
            monitor = (build_loader(bank_uris, **eval_kw), build_loader(query_uris, **eval_kw))

    clock = StageClock("pretrain", "epoch", p.epochs, start_epoch)
    events = EventLog(loop_config["events"]) if rank == 0 and loop_config.get("events") else None
    for epoch in range(start_epoch, p.epochs):
        loader.set_epoch(epoch)
        metrics = train_one_epoch(
            model, online, loader, optimizer, scaler, cfg, epoch=epoch, total_steps=total_steps,
            lr_peak=lr_peak, compute=compute,
        )
        metrics["start_epoch"] = start_epoch  # > 0 after a restore: the run resumed, it did not start over
        last = epoch == p.epochs - 1
        if monitor is not None and ((epoch + 1) % p.knn_every == 0 or last or epoch == 0):
            acc = knn_monitor(model.backbone, *monitor, manifest.num_classes, p.knn_k, compute)
            if acc is not None:
                metrics["knn_accuracy"] = acc
        history.append(metrics)
        if rank == 0:
            log.info("%s", clock.line(epoch + 1, metrics))
        if events is not None:
            events.log(epoch, metrics)
        train_state.report(metrics, cfg, (epoch + 1) % p.checkpoint_every == 0 or last, epoch=epoch, history=history)
    if events is not None:
        events.close()


# ---------------------------------------------------------------- entry point


def run_name(cfg: Config) -> str:
    return f"{cfg.run.name}-pretrain"


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> PretrainResult:
    """Pretrain on a Ray Train worker group and write ``byol.safetensors``; see the module docstring."""
    out = join(cfg.run.output_dir, "pretrain")
    weights = join(out, WEIGHTS)
    check_inputs(cfg)
    name = run_name(cfg)
    if guard_output(out, "a pretrained model", weights, resume=resume, overwrite=overwrite, remove=weights):
        _, meta = rio.load_weights(weights)
        if config_from_yaml(meta["config"]).model != cfg.model:
            raise RaysemiError(f"{weights} was pretrained with another model config: pass --overwrite")
        log.info("reusing the pretrained model at %s", weights)
        return PretrainResult(weights, read_json(join(out, "metrics.json")), out)
    storage = ray_utils.storage_root(cfg)
    guard_output(storage, f"an unfinished pretraining run {name!r}", join(storage, name), resume=resume,
                 overwrite=overwrite)
    if overwrite:  # what Ray Train wrote there, nothing else
        ray_utils.remove_train_run(name, cfg)

    if not resume:
        clear_events(out)
    t0 = time.time()
    result = ray_utils.fit(train_worker, {"cfg": cfg.to_dict(), "events": out}, cfg, name)
    if result.checkpoint is None:
        raise RaysemiError(f"pretraining run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = rio.load_state(d)
    history = state["history"]
    write_bytes_atomic(join(out, "config.yaml"), config_to_yaml(cfg).encode())
    write_json(join(out, "metrics.json"), history)
    rio.save_weights(
        weights, state["model"],
        metadata={"config": config_to_yaml(cfg), "backbone": cfg.model.backbone, "epochs": str(len(history))},
    )
    log.info("pretraining done in %.0f s: %s", time.time() - t0, weights)
    return PretrainResult(weights, history, out)
