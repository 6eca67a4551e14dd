"""Fine-tuning (and each round's retraining): builder, ``train_interval``, worker, ``run``.

The BYOL predictor is replaced by a linear classifier (on the projector output by default, as in the
method paper; on the encoder features with ``model.head=encoder``), and the network is trained with
cross-entropy on a training set written by ``data.trainset`` (true labels with weight 1, pseudo-labels with
``finetune.pseudo_weight``; hard labels, or the teacher's probabilities with soft targets).
``finetune.freeze_backbone`` turns it into a linear probe. A round runs ``finetune.steps`` optimizer steps
(``training_plan``), the same whatever the size of its training set, so rounds and baselines compare at
equal compute. Validation accuracy is measured every ``eval_every`` steps, each rank on its share of the val
shards, the counts summed over ranks (``validate``); the model of the last
step is kept (its EMA when ``finetune.ema_decay`` > 0; the best *round* is chosen by the pipeline).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import ModelEmaV3

from raysemi.core import io as rio
from raysemi.core.config import Config, FinetuneConfig, from_dict
from raysemi.core.console import StageClock
from raysemi.core.errors import RaysemiError
from raysemi.core.event_log import EventLog
from raysemi.core.io import join, write_json
from raysemi.data.loading.batches import in_background
from raysemi.data.loading.loader import build_loader
from raysemi.data.shards import read_manifest, split_batch
from raysemi.data.trainset import TrainSet
from raysemi.distributed import ray_utils
from raysemi.ml.compute import Compute, compute_for
from raysemi.ml.losses import cross_entropy
from raysemi.ml.optim import build_optimizer, param_groups, set_lr
from raysemi.ml.schedules import warmup_cosine_lr
from raysemi.models.backbone import unwrap
from raysemi.models.byol import Classifier
from raysemi.models.checkpoint import build_classifier, classifier_from_byol, load_classifier, save_classifier
from raysemi.models.checkpoint import check_init as check_classifier_init
from raysemi.stages import consistency
from raysemi.stages.common import StepTimer, all_reduce_sum, wrap_ddp
from raysemi.stages.inference import predict_probs
from raysemi.stages.worker import TrainState, build_replica, use_threads

log = logging.getLogger("raysemi.finetune")

WEIGHTS = "classifier.safetensors"


@dataclass(frozen=True)
class FinetuneResult:
    weights: str
    sha256: str
    history: list[dict[str, Any]]
    seconds: float
    steps: int = 0  # optimizer steps of the round (0 when a finished round was reused)
    images_seen: int = 0


# ---------------------------------------------------------------- builders


def initial_classifier(cfg: Config, num_classes: int, init: str | None) -> Classifier:
    """Classifier from BYOL weights (``byol.safetensors``), a previous round's classifier, or random init."""
    if init is None:
        model = build_classifier(cfg, num_classes)
    elif init.endswith(WEIGHTS):
        model, _, classes = load_classifier(init)
        if len(classes) != num_classes:
            raise RaysemiError(f"{init} predicts {len(classes)} classes, the dataset has {num_classes}")
        model.train()
    else:
        model = classifier_from_byol(cfg, num_classes, init)
    if cfg.finetune.freeze_backbone:
        model.freeze_backbone(include_projector=True)
    return model


def optimizer_groups(model: Classifier, weight_decay: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups: the head's at the full lr, the pretrained parts'
    (backbone, projector) at ``backbone_lr_scale`` times it (``optim.set_lr`` applies ``lr_scale``)."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [dict(g, lr_scale=1.0) for g in param_groups(head, weight_decay)]
    if body:
        groups += [dict(g, lr_scale=backbone_lr_scale) for g in param_groups(body, weight_decay)]
    return groups


def check_init(cfg: Config, num_classes: int, init: str | None) -> None:
    """In the driver, before anything is written or any worker starts: refuse an ``init`` that
    ``initial_classifier`` would refuse in every worker (another backbone, shapes or class count; not there)."""
    if init is not None:
        check_classifier_init(cfg, num_classes, init, classifier=init.endswith(WEIGHTS))


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights N / (C * n_c); classes without rows get weight 0."""
    c = torch.tensor(counts, dtype=torch.float32)
    w = torch.where(c > 0, c.sum() / (len(counts) * c.clamp(min=1)), torch.zeros_like(c))
    return w


@dataclass(frozen=True)
class TrainingPlan:
    """How long a round trains, in optimizer steps: the same for every round and baseline when
    ``finetune.steps`` is set, whatever the size of the training set."""

    total_steps: int
    warmup_steps: int
    interval: int  # steps between validations / reports ("an epoch" in the metrics)

    @property
    def intervals(self) -> int:
        return math.ceil(self.total_steps / self.interval)


def training_plan(f: FinetuneConfig, steps_per_epoch: int) -> TrainingPlan:
    """``finetune.steps`` steps with ``warmup_steps`` of warmup, validated every ``eval_every``; or, with
    ``steps: null``, ``epochs`` passes over the training set with ``warmup_epochs``, validated per epoch."""
    if f.steps is None:
        return TrainingPlan(f.epochs * steps_per_epoch, f.warmup_epochs * steps_per_epoch, steps_per_epoch)
    return TrainingPlan(f.steps, min(f.warmup_steps, f.steps), min(f.eval_every, f.steps))


# ---------------------------------------------------------------- one interval / evaluation


def train_interval(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    *,
    start_step: int,
    plan: TrainingPlan,
    compute: Compute,
    weights_per_class: torch.Tensor | None,
    ema: ModelEmaV3 | None = None,
    pool: Iterable[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Train on ``batches`` (one interval of the plan, from global step ``start_step``); the lr follows the
    plan's warmup + cosine schedule and the EMA (when given) is updated after every step. ``pool`` (pair
    batches of the unlabelled pool, one per step) adds FixMatch's consistency term (``stages/consistency.py``).

    The loss and the correct predictions are summed on the device and read once, at the end of the interval:
    an ``.item()`` per step would make the host wait for the device at every step."""
    f = cfg.finetune
    device = compute.device
    model.train()
    timer = StepTimer()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = steps = 0
    lr = 0.0
    fm = cfg.fixmatch
    stats = consistency.PoolStats(device) if pool is not None else None
    pool_it = iter(timer.batches(pool)) if pool is not None else None
    teacher = None
    if pool is not None:
        teacher = ema.module if fm.ema_teacher and ema is not None else unwrap(model)
    for i, batch in enumerate(timer.batches(batches)):
        step = start_step + i
        lr = warmup_cosine_lr(step, plan.total_steps, plan.warmup_steps, f.lr)
        set_lr(optimizer, lr)
        targets = batch["label"]
        if "target" in batch:  # soft targets (Noisy Student): class probabilities per row
            targets = torch.tensor(batch["target"], dtype=torch.float32, device=device)
        images, unl = batch["image"], None
        if pool_it is not None:
            unl = next(pool_it)
            probs = consistency.teacher_probs(teacher, unl["weak"], compute)
            images = torch.cat([images, unl["strong"]])  # one forward: batch norm sees both together (FixMatch)
        with compute.autocast():
            out = model(compute.images(images))
        logits = out[: len(targets)]
        loss = cross_entropy(
            logits.float(), targets, weights=batch["weight"], class_weights=weights_per_class,
            label_smoothing=f.label_smoothing,
        )
        if unl is not None:
            term, mask = consistency.consistency_term(out[len(targets):], probs, fm.weight, fm.threshold,
                                                      weights_per_class)
            stats.add(term, mask, probs, unl["label"])
            loss = loss + term
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(unwrap(model), step=step + 1)
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == batch["label"]).sum()
        seen += len(batch["label"])
        steps += 1
    timer.stop()
    extra = stats.totals() if stats is not None else []
    loss_tot, steps_tot, correct_tot, seen_tot, *pool_tot = all_reduce_sum(
        [float(loss_sum), steps, int(correct), seen, *extra], device)
    metrics = {
        "step": start_step + int(steps),
        "loss": loss_tot / max(steps_tot, 1),
        "train_accuracy": correct_tot / max(seen_tot, 1),
        "lr": lr,
        "images_seen": seen_tot,
        "images_per_s_total": seen_tot / timer.total if timer.total else 0.0,
        "data_wait_fraction": timer.data_wait_fraction,
        "workers": ray_utils.world_size(),
        **compute.describe(),
    }
    if stats is not None:
        metrics.update(consistency.PoolStats.metrics(pool_tot, steps_tot))
    return metrics


def val_shares(uris: list[str], rank: int, world: int) -> list[str]:
    """The val shards rank ``rank`` of ``world`` validates: round-robin (a rank may get none)."""
    return list(uris[rank::world])


def validate(model: torch.nn.Module, loader, compute: Compute) -> float:
    """Accuracy over every rank's share of the val split (``loader`` None: this rank has no share); every
    rank must call it, since the counts are all-reduced."""
    correct, seen = 0.0, 0.0
    if loader is not None:
        _, y, p = predict_probs(model, loader, compute)
        correct, seen = float((p.argmax(1) == y).sum()), float(len(y))
    correct, seen = all_reduce_sum([correct, seen], compute.device)
    return correct / seen if seen else float("nan")


def build_ema(model: torch.nn.Module, decay: float) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of the weights and BN buffers, its decay warmed up (``1 - (1 + t)^(-2/3)``
    capped at ``decay``) so that a short fine-tuning is not dominated by the random head; None when off."""
    return ModelEmaV3(model, decay=decay, use_warmup=True) if decay > 0 else None


# ---------------------------------------------------------------- the Ray Train worker


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: a thin adapter from Ray (rank, device, checkpoints) to the functions above."""
    cfg = from_dict(loop_config["cfg"])
    f = cfg.finetune
    device = ray_utils.get_device()
    rank, world = ray_utils.world_rank(), ray_utils.world_size()
    trainset = TrainSet(**loop_config["trainset"])
    num_classes = len(trainset.class_counts)
    use_threads(cfg.ray.torch_threads)

    batch = min(split_batch(f.batch_size, world), min(sum(trainset.rows[r::world]) for r in range(world)))
    if batch < split_batch(f.batch_size, world) and rank == 0:
        log.warning("finetune.batch_size lowered to %d per worker: the training set has %d rows",
                    batch, trainset.total)
    loader = build_loader(
        trainset.uris, mode="train", size=cfg.data.image_size, batch_size=batch, augment=cfg.augment,
        rank=rank, world_size=world, seed=f.seed, backend=cfg.data.loader, device=device,
        num_threads=cfg.data.num_threads, shard_rows=trainset.rows,
        columns_extra=("target",) if trainset.soft else (), decode_cache_mb=cfg.data.decode_cache_mb,
    )
    # The checkpoint of a restarted group is read before the model is built, for its step: the decoders
    # then start at once, in the background, and their start-up overlaps the model's build.
    state = ray_utils.restored_state(device)
    step = int(state["step"]) if state is not None else 0
    plan = training_plan(f, len(loader))
    stream = loader.stream(step, plan.total_steps)  # one decoder start-up for the round
    pool_stream = None
    if loop_config.get("pool"):  # FixMatch: ratio x the batch of pool images per step, from its own loader
        pool_stream = consistency.pool_stream(consistency.PoolSet(**loop_config["pool"]), cfg, batch, rank, world,
                                              device, step, plan.total_steps)
    if loader.backend == "dali":
        # DALI decodes in threads of its own. Not the torch backend: its DataLoader forks worker processes,
        # and a fork from a second thread while this one builds the model can copy a held lock into the
        # child (a restarted worker's DataLoader child hung on a futex in the multi-node tests).
        stream = in_background(stream)
        pool_stream = in_background(pool_stream) if pool_stream is not None else None

    compute = compute_for(device, f.precision, f.channels_last)
    model = compute.model(build_replica(lambda: initial_classifier(cfg, num_classes, loop_config["init"]), f.seed,
                                        cfg.model.sync_batchnorm, device))
    ddp_model = wrap_ddp(model, device)
    optimizer = build_optimizer(f.optimizer, optimizer_groups(model, f.weight_decay, f.backbone_lr_scale),
                                f.lr, f.weight_decay)
    train_state = TrainState(model, optimizer, compute.grad_scaler(), build_ema(model, f.ema_decay))
    scaler, ema = train_state.scaler, train_state.ema
    if f.compile:  # in place, after the EMA's copy: the state dict keeps its keys
        ddp_model.compile()
    history: list[dict[str, Any]] = []
    if state is not None:
        train_state.load_state_dict(state)
        history = list(state["history"])
    # Every rank validates its share of the val shards (round-robin, as training assigns them) and the counts
    # are summed: a large val split takes 1/world of the time, and no rank waits on rank 0 past the
    # collective timeout (ray.collective_timeout_s).
    val_uris = val_shares(read_manifest(cfg.data.path).shard_uris(cfg.data.path, "val"), rank, world)
    val_loader = build_loader(
        val_uris, mode="eval", size=cfg.data.image_size, batch_size=max(batch, 64), augment=cfg.augment,
        backend=cfg.data.loader, device=device, num_threads=cfg.data.num_threads,
        decode_cache_mb=cfg.data.decode_cache_mb,
    ) if val_uris else None
    cw = class_weights(trainset.class_counts).to(device) if f.class_weighting else None
    clock = StageClock(loop_config.get("label", "finetune"), "step", plan.total_steps, step)
    events = EventLog(loop_config["events"]) if rank == 0 and loop_config.get("events") else None
    while step < plan.total_steps:
        n = min((step // plan.interval + 1) * plan.interval, plan.total_steps) - step
        metrics = train_interval(ddp_model, itertools.islice(stream, n), optimizer, scaler, cfg,
                                  start_step=step, plan=plan, compute=compute, weights_per_class=cw, ema=ema,
                                  pool=itertools.islice(pool_stream, n) if pool_stream is not None else None)
        step = int(metrics["step"])
        metrics["epoch"] = math.ceil(step / plan.interval) - 1
        metrics["val_accuracy"] = validate(ema.module if ema is not None else model, val_loader, compute)
        if rank == 0:
            log.info("%s", clock.line(step, metrics))
        if events is not None:
            events.log(step, metrics)
        history.append(metrics)
        due = (metrics["epoch"] + 1) % f.checkpoint_every == 0 or step >= plan.total_steps
        train_state.report(metrics, cfg, due, step=step, history=history)
    stream.close()
    if pool_stream is not None:
        pool_stream.close()
    if events is not None:
        events.close()


# ---------------------------------------------------------------- entry point


def run(cfg: Config, trainset: TrainSet, init: str | None, out_dir: str, name: str,
        classes: list[str], label: str = "finetune", pool: consistency.PoolSet | None = None) -> FinetuneResult:
    """Train a classifier on ``trainset`` with Ray Train and save it as ``<out_dir>/classifier.safetensors``.
    ``label`` names the stage in the progress lines (e.g. ``round 1``); ``pool`` adds FixMatch's consistency
    term on those shards (``stages/consistency.py``)."""
    t0 = time.time()
    check_init(cfg, len(classes), init)
    loop = {"cfg": cfg.to_dict(), "trainset": trainset.__dict__, "init": init, "label": label,
            "events": out_dir, "pool": pool.__dict__ if pool is not None else None}
    result = ray_utils.fit(train_worker, loop, cfg, name)
    if result.checkpoint is None:
        raise RaysemiError(f"fine-tuning run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = rio.load_state(d)
    model = build_classifier(cfg, len(classes))
    model.load_state_dict(state.get("ema", state["model"]))  # the EMA model is the one exported
    weights = join(out_dir, WEIGHTS)
    history = state["history"]
    steps, images = int(state["step"]), int(sum(h["images_seen"] for h in history))
    sha = save_classifier(weights, model, cfg, classes,
                          extra={"trainset_rows": trainset.total, "steps": steps, "images_seen": images})
    write_json(join(out_dir, "finetune_metrics.json"), history)
    return FinetuneResult(weights, sha, history, time.time() - t0, steps, images)
