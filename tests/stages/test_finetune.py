"""The fine-tuning stage's pieces: the step plan, one interval of training, the EMA, class weights; and their
wiring in a round (class weights and pseudo-label weights reach the loss, the EMA is what is exported)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from raysemi.core.config import Config, FinetuneConfig
from raysemi.core.io import join
from raysemi.data.labels import LabelRule
from raysemi.data.shards import local_map, read_manifest, read_shard
from raysemi.data.trainset import LabeledRows, SourceShard, TrainSet, write_trainset
from raysemi.ml.optim import build_optimizer
from raysemi.models.checkpoint import build_classifier
from raysemi.stages import commits, finetune, pool
from raysemi.stages.finetune import (
    TrainingPlan,
    build_ema,
    class_weights,
    initial_classifier,
    optimizer_groups,
    train_interval,
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
    model = initial_classifier(cfg, 3, None)
    opt = build_optimizer("adamw", model.parameters(), 0.01, 0.0)
    plan = TrainingPlan(total_steps=40, warmup_steps=0, interval=20)
    scaler = FP32.grad_scaler()
    batches = fixed_batches(soft=soft)
    first = train_interval(model, itertools.islice(batches, 20), opt, scaler, cfg, start_step=0, plan=plan,
                            compute=FP32, weights_per_class=None)
    second = train_interval(model, itertools.islice(batches, 20), opt, scaler, cfg, start_step=20, plan=plan,
                             compute=FP32, weights_per_class=None)
    assert first["step"] == 20 and second["step"] == 40
    assert first["images_seen"] == 20 * 12
    # Soft targets cannot go below their own entropy: compare the excess over it.
    t = torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    floor = float(-(t * t.log()).sum()) if soft else 0.0
    assert second["loss"] - floor < 0.5 * (first["loss"] - floor)
    assert second["train_accuracy"] == 1.0


def pool_batches(n=8, size=16, seed=1, labels=None):
    g = torch.Generator().manual_seed(seed)
    weak = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % 3 if labels is None else labels
    return itertools.repeat({"weak": weak, "strong": weak + 0.5 * torch.randn(weak.shape, generator=g), "label": y})


def test_fixmatch_step_adds_the_consistency_term_of_the_teachers_confident_rows():
    """One step with a pool: the loss is the labelled CE plus weight x FixMatch's term, computed here by hand from
    one joint forward (labelled + strong views) and the teacher (the model, eval mode) on the weak views; the
    pool's stored labels teach nothing."""
    base = tiny_cfg(ema_decay=0.0, label_smoothing=0.0, lr=0.01, warmup_steps=0, drop_path_rate=0.0)
    batch, pool = next(fixed_batches()), next(pool_batches())
    torch.manual_seed(0)
    reference = initial_classifier(base, 3, None)
    reference.eval()
    with torch.no_grad():
        probs = torch.softmax(reference(pool["weak"]), 1)
    reference.train()
    with torch.no_grad():
        out = reference(torch.cat([batch["image"], pool["strong"]]))
    threshold = float(probs.max(1).values.median())  # half the rows above it
    cfg = base.replace(**{"fixmatch.weight": 2.0, "fixmatch.threshold": threshold})
    results = []
    for labels in (None, torch.full((8,), -1)):
        torch.manual_seed(0)
        model = initial_classifier(cfg, 3, None)
        opt = build_optimizer("adamw", model.parameters(), 0.01, 0.0)
        m = train_interval(model, itertools.islice(fixed_batches(), 1), opt, FP32.grad_scaler(), cfg, start_step=0,
                           plan=TrainingPlan(1, 0, 1), compute=FP32, weights_per_class=None,
                           pool=itertools.islice(pool_batches(labels=labels), 1))
        results.append((m, {k: v.clone() for k, v in model.state_dict().items()}))
    m, weights = results[0]
    keep = probs.max(1).values >= threshold
    assert 0 < int(keep.sum()) < 8  # both sides of the threshold
    ce = torch.nn.functional.cross_entropy(out[:12], batch["label"])
    term = (torch.nn.functional.cross_entropy(out[12:], probs.argmax(1), reduction="none") * keep).mean()
    assert m["loss"] == pytest.approx(float(ce + 2.0 * term), rel=1e-5)
    assert m["pool_images_seen"] == 8 and m["pool_mask_rate"] == pytest.approx(float(keep.float().mean()))
    assert m["pool_pseudo_accuracy"] == pytest.approx(
        float((probs.argmax(1) == torch.arange(8) % 3)[keep].float().mean()))
    # the same step with the pool's labels hidden: the same weights, no pseudo-accuracy to report
    hidden, same = results[1]
    assert all(torch.equal(weights[k], same[k]) for k in weights) and hidden["pool_pseudo_accuracy"] is None


def test_ema_tracks_the_weights_and_lags_behind():
    torch.manual_seed(0)
    cfg = tiny_cfg(ema_decay=0.9, lr=0.05, warmup_steps=0)
    model = initial_classifier(cfg, 3, None)
    ema = build_ema(model, 0.9)
    assert build_ema(model, 0.0) is None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer("sgd", model.parameters(), 0.05, 0.0)
    train_interval(model, itertools.islice(fixed_batches(), 10), opt, FP32.grad_scaler(), cfg,
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
    model = initial_classifier(cfg, 3, None)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.1, 0.0)
    train_interval(model, itertools.islice(fixed_batches(), 3), opt, FP32.grad_scaler(), cfg,
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
        model = initial_classifier(cfg, 3, None)
        groups = optimizer_groups(model, 0.0, scale)
        assert sorted({g["lr_scale"] for g in groups}) == sorted({1.0, scale})
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        before = {k: v.clone() for k, v in model.named_parameters()}
        opt = build_optimizer("sgd", groups, cfg.finetune.lr, 0.0)
        train_interval(model, itertools.islice(fixed_batches(), 1), opt, FP32.grad_scaler(), cfg,
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
    from raysemi.stages.pretrain import build_byol

    save_weights(uri, build_byol(cfg).state_dict(), {"config": config_to_yaml(meta_cfg or cfg)})
    return uri


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if a Ray Train run (or Ray itself) is started."""
    from raysemi.distributed import ray_session, ray_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker was started")

    monkeypatch.setattr(ray_utils, "fit", refuse)
    monkeypatch.setattr(ray_session, "init_ray", refuse)


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


# ---------------------------------------------------------------- wiring: training-set rows -> loss, EMA -> export
#
# ``finetune.run`` end to end in this process: ``ray_utils.fit`` calls ``train_worker`` here (rank 0 of 1, on
# the CPU) and keeps the checkpoints it reports as Ray Train would; the loss the loop optimises is observed
# at the call (``finetune.cross_entropy``), the exported weights read back from ``classifier.safetensors``.


@dataclass(frozen=True)
class IdRule:
    """A ``LabelRule`` stand-in for ``LabeledRows``: the labelled rows are exactly these ids."""

    ids: frozenset

    def chosen(self, table: pa.Table) -> np.ndarray:
        return np.isin(np.asarray(table.column("id").to_pylist(), dtype=object), list(self.ids))


def labelled_rows(root: str, per_class: tuple[int, ...]) -> tuple[list[SourceShard], IdRule]:
    """The demo set's train shards and a rule keeping the first ``per_class[c]`` rows of each class c."""
    manifest = read_manifest(root)
    shards = [SourceShard(u, "train", s.rows) for u, s in zip(manifest.shard_uris(root, "train"),
                                                              manifest.splits["train"].shards)]
    left, ids = list(per_class), set()
    for s in shards:
        for row in read_shard(s.uri, ["id", "label"]).to_pylist():
            if left[row["label"]] > 0:
                left[row["label"]] -= 1
                ids.add(row["id"])
    assert not any(left), "the demo set has too few train rows of a class"
    return shards, IdRule(frozenset(ids))


def labelled_set(root: str, out: str, per_class: tuple[int, ...]) -> TrainSet:
    shards, rule = labelled_rows(root, per_class)
    return write_trainset(LabeledRows(rule, len(per_class)), shards, out, 2)


def pseudo_set(root: str, out: str, weight: float, pred_class: int, n: int) -> TrainSet:
    """The first ``n`` rows of the unlabeled split pseudo-labelled ``pred_class`` (the others under
    ``min_confidence``), chosen by the pool's real view and selection and written with ``weight``."""
    manifest = read_manifest(root)
    k = len(manifest.classes)
    pred_uri, shards, left = join(out, "predictions"), [], n
    for i, (uri, info) in enumerate(zip(manifest.shard_uris(root, "unlabeled"), manifest.splits["unlabeled"].shards)):
        ids = read_shard(uri, ["id"]).column("id")
        conf = np.full(len(ids), 0.1, np.float32)
        conf[: max(0, min(left, len(ids)))] = 0.9
        left -= len(ids)
        probs = np.full((len(ids), k), 0.0, np.float32)
        probs[:, pred_class] = 1.0
        preds = pa.table({"id": ids, "pred": pa.array(np.full(len(ids), pred_class), pa.int16()),
                          "confidence": conf, "probs": pa.array(list(probs), pa.list_(pa.float32()))})
        commits.commit(pred_uri, i, uri, preds, "m" * 64, info.sha256, input_ids=ids)
        shards.append(SourceShard(uri, "unlabeled", info.rows, commits.part_uri(pred_uri, i)))
    view = pool.PoolView(LabelRule(0, ("all",) * k), k, min_confidence=0.5)
    rule, _ = pool.select(shards, view, budget=10 * n, prior=None, map_fn=local_map)
    return write_trainset(pool.PseudoRows(view, rule, weight), shards, join(out, "trainset"), 2)


def wiring_cfg(root: str, **finetune) -> Config:
    base = {"steps": 3, "eval_every": 3, "warmup_steps": 0, "batch_size": 8, "lr": 0.05, "precision": "fp32",
            "channels_last": False, "compile": False, "label_smoothing": 0.0, "drop_path_rate": 0.0,
            "checkpoint_every": 1}
    cfg = tiny_cfg(**{**base, **finetune})
    return cfg.replace(**{"data.path": root, "data.image_size": 32, "data.loader": "torch", "data.num_threads": 1,
                          "data.decode_cache_mb": 0})


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """``ray_utils.fit`` runs the worker in this process on the CPU and returns its last reported checkpoint."""
    from raysemi.core.io import save_state
    from raysemi.distributed import ray_utils

    saved: list[Path] = []

    def report(metrics, state=None, cfg=None):
        if state is not None:
            saved.append(tmp_path / f"checkpoint-{len(saved)}")
            save_state(saved[-1], state, cfg)

    class Checkpoint:
        def __init__(self, directory):
            self.directory = directory

        @contextlib.contextmanager
        def as_directory(self):
            yield str(self.directory)

    def fit(worker_fn, loop_config, cfg, name):
        worker_fn(copy.deepcopy(loop_config))
        return SimpleNamespace(checkpoint=Checkpoint(saved[-1]) if saved else None)

    monkeypatch.setattr(ray_utils, "fit", fit)
    monkeypatch.setattr(ray_utils, "report", report)
    monkeypatch.setattr(ray_utils, "get_device", lambda: CPU)
    return saved


@pytest.fixture
def loss_calls(monkeypatch):
    """Every call of the loss by the training loop: its arguments and the loss it returned."""
    calls: list[dict] = []
    real = finetune.cross_entropy

    def spy(logits, targets, weights=None, class_weights=None, label_smoothing=0.0):
        loss = real(logits, targets, weights=weights, class_weights=class_weights, label_smoothing=label_smoothing)
        calls.append({"logits": logits.detach().clone(), "targets": targets.detach().clone(),
                      "weights": None if weights is None else weights.detach().clone(),
                      "class_weights": None if class_weights is None else class_weights.detach().clone(),
                      "loss": float(loss.detach())})
        return loss

    monkeypatch.setattr(finetune, "cross_entropy", spy)
    return calls


def run_round(cfg: Config, trainset: TrainSet, out: Path) -> finetune.FinetuneResult:
    return finetune.run(cfg, trainset, None, str(out), "wiring", read_manifest(cfg.data.path).classes)


@pytest.mark.parametrize("weighting", [True, False])
def test_class_weighting_hands_the_inverse_frequency_weights_of_the_labelled_counts_to_the_loss(
        demo_dataset, tmp_path, in_process, loss_calls, weighting):
    ts = labelled_set(demo_dataset, str(tmp_path / "labelled"), (12, 4, 8))
    assert ts.class_counts == [12, 4, 8]  # tallied from the rows written
    cfg = wiring_cfg(demo_dataset, class_weighting=weighting)
    run_round(cfg, ts, tmp_path / "round")
    assert len(loss_calls) == 3
    # N / (C * n_c) = 24 / (3 * n_c)
    want = torch.tensor([24 / 36, 24 / 12, 24 / 24]) if weighting else None
    for call in loss_calls:
        assert call["targets"].dtype == torch.int64  # hard labels
        assert call["weights"] is not None and (call["weights"] == 1).all()  # true labels only: weight 1
        if weighting:
            torch.testing.assert_close(call["class_weights"], want)
            expected = torch.nn.functional.cross_entropy(call["logits"], call["targets"], weight=want)
        else:
            assert call["class_weights"] is None
            expected = torch.nn.functional.cross_entropy(call["logits"], call["targets"])
        assert call["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_pseudo_label_rows_carry_the_configured_weight_into_the_loss(demo_dataset, tmp_path, in_process, loss_calls):
    cfg = wiring_cfg(demo_dataset, pseudo_weight=0.25, class_weighting=True, steps=4, eval_every=4)
    labelled = labelled_set(demo_dataset, str(tmp_path / "labelled"), (8, 8, 0))
    pseudo = pseudo_set(demo_dataset, str(tmp_path / "round1"), cfg.finetune.pseudo_weight, pred_class=2, n=12)
    assert pseudo.class_counts == [0, 0, 12]
    ts = labelled.plus(pseudo)  # as a round assembles it: class 2 holds only pseudo-labels
    run_round(cfg, ts, tmp_path / "round")
    assert len(loss_calls) == 4
    cw = torch.tensor([28 / 24, 28 / 24, 28 / 36])  # N / (C * n_c) over labelled + pseudo rows [8, 8, 12]
    seen = {"pseudo": 0, "true": 0}
    for call in loss_calls:
        y, w = call["targets"], call["weights"]
        pseudo_rows = y == 2
        assert w is not None and w.shape == y.shape
        assert (w[pseudo_rows] == 0.25).all() and (w[~pseudo_rows] == 1.0).all()
        seen["pseudo"] += int(pseudo_rows.sum())
        seen["true"] += int((~pseudo_rows).sum())
        torch.testing.assert_close(call["class_weights"], cw)
        per_row = torch.nn.functional.cross_entropy(call["logits"], y, reduction="none")
        expected = (w * cw[y] * per_row).sum() / (w * cw[y]).sum()
        assert call["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert seen["pseudo"] > 0 and seen["true"] > 0


@pytest.mark.parametrize("decay", [0.9, 0.0])
def test_the_exported_classifier_holds_the_ema_weights_when_the_ema_is_on(
        demo_dataset, tmp_path, in_process, monkeypatch, decay):
    from raysemi.core.io import load_weights

    built: dict = {}
    real_model, real_ema = finetune.initial_classifier, finetune.build_ema

    def initial_classifier(*args):
        built["model"] = real_model(*args)
        built["init"] = {k: v.clone() for k, v in built["model"].state_dict().items()}
        return built["model"]

    def build_ema(*args):
        built["ema"] = real_ema(*args)
        return built["ema"]

    monkeypatch.setattr(finetune, "initial_classifier", initial_classifier)
    monkeypatch.setattr(finetune, "build_ema", build_ema)
    cfg = wiring_cfg(demo_dataset, ema_decay=decay)
    ts = labelled_set(demo_dataset, str(tmp_path / "labelled"), (8, 8, 8))
    result = run_round(cfg, ts, tmp_path / "round")
    assert result.weights == str(tmp_path / "round" / finetune.WEIGHTS) and result.steps == 3

    saved, _ = load_weights(result.weights)
    raw, init = built["model"].state_dict(), built["init"]
    assert saved.keys() == raw.keys()
    w = "head.fc.weight"
    assert not torch.equal(raw[w], init[w])  # the online model did train
    if decay > 0:
        ema = built["ema"].module.state_dict()
        assert all(torch.equal(saved[k], ema[k]) for k in saved)
        # the EMA moved off the initial weights and lags the online ones: neither end is what was exported
        assert not torch.equal(saved[w], raw[w]) and not torch.equal(saved[w], init[w])
        assert sum(not torch.equal(saved[k], raw[k]) for k in saved if saved[k].is_floating_point()) > 10
    else:
        assert built["ema"] is None
        assert all(torch.equal(saved[k], raw[k]) for k in saved)
