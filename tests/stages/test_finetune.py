"""The fine-tuning stage's pieces: the step plan, one interval of training, the EMA, class weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from raysemi.core.config import Config, FinetuneConfig
from raysemi.ml.optim import build_optimizer
from raysemi.models.checkpoint import build_classifier
from raysemi.stages import finetune
from raysemi.stages.finetune import (
    TrainingPlan,
    build_ema,
    build_model,
    class_weights,
    optimizer_groups,
    train_one_epoch,
    training_plan,
)
from raysemi.stages.inference import FP32

CPU = torch.device("cpu")


def tiny_cfg(**finetune) -> Config:
    cfg = Config().replace(**{"model.backbone": "test_resnet", "model.small_image": False,
                              "model.proj_hidden_dim": 16, "model.proj_dim": 8, "model.pred_hidden_dim": 16})
    return cfg.replace(**{f"finetune.{k}": v for k, v in finetune.items()})


def fixed_batches(n_classes=3, n=12, size=16, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    batch = {"image": torch.randn(n, 3, size, size, generator=g) + y.view(-1, 1, 1, 1).float(),
             "label": y, "weight": torch.ones(n)}
    if soft:
        batch["target"] = torch.nn.functional.one_hot(y, n_classes).float().mul(0.9).add(0.1 / n_classes).tolist()
    return itertools.repeat(batch)


def test_training_plan_counts_steps_not_epochs():
    # Steps: the same whatever the training set's size; validation every eval_every steps.
    plan = training_plan(FinetuneConfig(steps=250, eval_every=100, warmup_steps=20), steps_per_epoch=4)
    assert plan == TrainingPlan(250, 20, 100) and plan.intervals == 3
    big = training_plan(FinetuneConfig(steps=250, eval_every=100, warmup_steps=20), steps_per_epoch=400)
    assert big == plan
    # Epochs (steps: null): the method paper's passes over the training set.
    legacy = training_plan(FinetuneConfig(steps=None, epochs=10, warmup_epochs=2), steps_per_epoch=5)
    assert legacy == TrainingPlan(50, 10, 5) and legacy.intervals == 10
    assert training_plan(FinetuneConfig(steps=30, eval_every=100), 9).interval == 30


@pytest.mark.parametrize("soft", [False, True])
def test_train_one_epoch_lowers_the_loss_and_counts_steps(soft):
    torch.manual_seed(0)
    cfg = tiny_cfg(ema_decay=0.0, label_smoothing=0.0, lr=0.01, warmup_steps=0, drop_path_rate=0.0)
    model = build_model(cfg, 3, None)
    opt = build_optimizer("adamw", model.parameters(), 0.01, 0.0)
    plan = TrainingPlan(total_steps=40, warmup_steps=0, interval=20)
    scaler = FP32.grad_scaler()
    batches = fixed_batches(soft=soft)
    first = train_one_epoch(model, itertools.islice(batches, 20), opt, scaler, cfg, start_step=0, plan=plan,
                            compute=FP32, weights_per_class=None)
    second = train_one_epoch(model, itertools.islice(batches, 20), opt, scaler, cfg, start_step=20, plan=plan,
                             compute=FP32, weights_per_class=None)
    assert first["step"] == 20 and second["step"] == 40
    assert first["images_seen"] == 20 * 12
    # Soft targets cannot go below their own entropy: compare the excess over it.
    t = torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    floor = float(-(t * t.log()).sum()) if soft else 0.0
    assert second["loss"] - floor < 0.5 * (first["loss"] - floor)
    assert second["train_accuracy"] == 1.0


def test_ema_tracks_the_weights_and_lags_behind():
    torch.manual_seed(0)
    cfg = tiny_cfg(ema_decay=0.9, lr=0.05, warmup_steps=0)
    model = build_model(cfg, 3, None)
    ema = build_ema(model, 0.9)
    assert build_ema(model, 0.0) is None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer("sgd", model.parameters(), 0.05, 0.0)
    train_one_epoch(model, itertools.islice(fixed_batches(), 10), opt, FP32.grad_scaler(), cfg,
                    start_step=0, plan=TrainingPlan(10, 0, 10), compute=FP32, weights_per_class=None, ema=ema)
    w = "head.fc.weight"
    now, avg, was = model.state_dict()[w], ema.module.state_dict()[w], start[w]
    assert not torch.equal(avg, now) and not torch.equal(avg, was)
    # The EMA lies between the start and the current weights (closer to the path than to either end).
    assert (avg - now).norm() < (was - now).norm()
    # Warm-up: the first update copies the model (decay 0), so the EMA never starts from the random head.
    assert ema.get_decay(1) == 0.0 and ema.get_decay(10_000) == pytest.approx(0.9)


def test_class_weights_inverse_frequency():
    w = class_weights([30, 10, 0, 20])
    assert w.tolist() == pytest.approx([60 / (4 * 30), 60 / (4 * 10), 0.0, 60 / (4 * 20)])
    # Weighted counts are equal: each present class carries the same total weight.
    assert 30 * w[0] == pytest.approx(10 * w[1]) == pytest.approx(20 * w[3])


def test_frozen_backbone_stays_frozen():
    cfg = tiny_cfg(freeze_backbone=True, ema_decay=0.0, warmup_steps=0)
    model = build_model(cfg, 3, None)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.1, 0.0)
    train_one_epoch(model, itertools.islice(fixed_batches(), 3), opt, FP32.grad_scaler(), cfg,
                    start_step=0, plan=TrainingPlan(3, 0, 3), compute=FP32, weights_per_class=None)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics alike


def test_backbone_lr_scale_moves_the_pretrained_parts_that_much_slower():
    """One SGD step from the same weights on the same batch: the head moves as far at either scale, the
    backbone and projector exactly ``backbone_lr_scale`` as far."""
    moves = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        cfg = tiny_cfg(backbone_lr_scale=scale, ema_decay=0.0, warmup_steps=0, drop_path_rate=0.0, lr=0.1)
        model = build_model(cfg, 3, None)
        groups = optimizer_groups(model, 0.0, scale)
        assert sorted({g["lr_scale"] for g in groups}) == sorted({1.0, scale})
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        before = {k: v.clone() for k, v in model.named_parameters()}
        opt = build_optimizer("sgd", groups, cfg.finetune.lr, 0.0)
        train_one_epoch(model, itertools.islice(fixed_batches(), 1), opt, FP32.grad_scaler(), cfg,
                        start_step=0, plan=TrainingPlan(1, 0, 1), compute=FP32, weights_per_class=None)
        moves[scale] = {k: (v - before[k]).norm().item() for k, v in model.named_parameters()}
    body = [k for k in moves[1.0] if not k.startswith("head.") and moves[1.0][k] > 0]
    assert any(k.startswith("backbone.") for k in body) and any(k.startswith("projector.") for k in body)
    for k in body:
        assert moves[0.1][k] == pytest.approx(0.1 * moves[1.0][k], rel=1e-4)
    for k in ("head.fc.weight", "head.fc.bias"):
        assert moves[0.1][k] == pytest.approx(moves[1.0][k], rel=1e-4) and moves[1.0][k] > 0


def test_student_noise_switches():
    plain = build_classifier(tiny_cfg(dropout=0.0, drop_path_rate=0.0), 3)
    noisy = build_classifier(tiny_cfg(dropout=0.3, drop_path_rate=0.2), 3)
    assert isinstance(plain.head.dropout, torch.nn.Identity)
    assert noisy.head.dropout.p == 0.3
    rates = [m.drop_prob for m in noisy.backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    assert not [m for m in plain.backbone.modules() if type(m).__name__ == "DropPath"]
    # Same tensors either way: a noisy student's file loads into a plain model (eval needs no noise).
    assert plain.state_dict().keys() == noisy.state_dict().keys()


# ---------------------------------------------------------------- --init checked in the driver


def save_byol(uri: str, cfg: Config, meta_cfg: Config | None = None) -> str:
    """A byol.safetensors of ``cfg``'s architecture, its metadata claiming ``meta_cfg`` (default: the same)."""
    from raysemi.core.config import config_to_yaml
    from raysemi.core.io import save_weights
    from raysemi.stages.pretrain import build_model as build_byol

    save_weights(uri, build_byol(cfg).state_dict(), {"config": config_to_yaml(meta_cfg or cfg)})
    return uri


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if a Ray Train run (or Ray itself) is started."""
    from raysemi.distributed import ray_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker was started")

    monkeypatch.setattr(ray_utils, "fit", refuse)
    monkeypatch.setattr(ray_utils, "init_ray", refuse)


def test_finetune_refuses_an_init_of_another_backbone_before_writing_anything(demo_dataset, tmp_path, no_workers):
    from raysemi.core.io import CheckpointError
    from raysemi.pipeline.run import finetune_only

    cfg = tiny_cfg().replace(**{"data.path": demo_dataset, "run.output_dir": str(tmp_path / "run")})
    other = tiny_cfg().replace(**{"model.backbone": "test_efficientnet"})
    byol = save_byol(str(tmp_path / "other.safetensors"), other)
    with pytest.raises(CheckpointError, match="holds a test_efficientnet .*not the configured test_resnet") as err:
        finetune_only(cfg, byol)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # no trainset/, no ray/

    # Metadata that lies about the backbone: the tensor shapes from the header still refuse it.
    liar = save_byol(str(tmp_path / "liar.safetensors"), other, meta_cfg=cfg)
    with pytest.raises(CheckpointError, match="does not fit the configured test_resnet backbone"):
        finetune_only(cfg, liar)
    with pytest.raises(CheckpointError, match="does not exist"):
        finetune_only(cfg, str(tmp_path / "missing.safetensors"))
    assert not (tmp_path / "run").exists()


def test_init_check_accepts_a_fitting_byol_and_checks_a_classifier_init(tmp_path):
    from raysemi.core.io import CheckpointError
    from raysemi.models.checkpoint import save_classifier
    from raysemi.stages.finetune import WEIGHTS, check_init

    cfg = tiny_cfg()
    check_init(cfg, 3, save_byol(str(tmp_path / "byol.safetensors"), cfg))  # fits: no error
    clf = str(tmp_path / WEIGHTS)
    save_classifier(clf, build_classifier(cfg, 3), cfg, ["a", "b", "c"])
    check_init(cfg, 3, clf)
    with pytest.raises(CheckpointError, match="predicts 3 classes, the dataset has 4"):
        check_init(cfg, 4, clf)
    with pytest.raises(CheckpointError, match="does not fit the configured classifier"):
        check_init(cfg.replace(**{"model.proj_dim": 4}), 3, clf)


def test_val_shares_cover_every_shard_once_and_validate_without_a_group_is_plain_accuracy():
    uris = [f"s{i}" for i in range(5)]
    shares = [finetune.val_shares(uris, r, 3) for r in range(3)]
    assert sorted(u for s in shares for u in s) == uris and [len(s) for s in shares] == [2, 2, 1]
    assert finetune.val_shares(uris[:1], 1, 2) == []  # a rank may have nothing to validate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, :, 0, 0]  # the logits are the first pixel's channels

    x = torch.zeros(6, 3, 2, 2)
    x[[0, 1, 2], [0, 1, 2], 0, 0] = 1.0  # rows 0-2 predict classes 0, 1, 2; rows 3-5 predict class 0
    batches = [{"image": x, "label": torch.tensor([0, 1, 1, 0, 2, 0]), "id": [str(i) for i in range(6)]}]
    assert finetune.validate(Fixed(), batches, FP32) == pytest.approx(4 / 6)
    assert math.isnan(finetune.validate(Fixed(), None, FP32))
