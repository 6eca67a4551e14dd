"""The method's loop end to end on tiny data: step counts, the pool, soft targets and the best-round rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysemi.core.config import load_config
from raysemi.core.event_log import read_scalars
from raysemi.data.labels import label_split
from raysemi.data.shards import read_manifest, read_split
from raysemi.distributed.ray_utils import node_cpus
from raysemi.ml.compute import cpu_has_bf16_units, resolve_precision
from raysemi.ml.metrics import best_round
from raysemi.pipeline.run import run_pipeline
from raysemi.stages.selection import budget_count

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
    "model.pred_hidden_dim=64", "data.image_size=32", "data.num_threads=1", "data.loader=torch",
    "data.label_fraction=0.2", "pretrain.epochs=1", "pretrain.warmup_epochs=0", "pretrain.knn_every=0",
    "pretrain.batch_size=32", "finetune.batch_size=16", "finetune.steps=6", "finetune.eval_every=3",
    "finetune.warmup_steps=2", "pseudolabel.rounds=1", "pseudolabel.budget=0.25", "pseudolabel.selection=prior",
    "pseudolabel.soft_targets=true", "pseudolabel.temperature=0.5", "pseudolabel.num_actors=1",
    "pseudolabel.cpus_per_actor=0.5", "pseudolabel.batch_size=64", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
    "ray.max_failures=0",
]


def test_full_run_counts_steps_keeps_the_pool_and_picks_the_best_round(ray_session, demo_dataset, tmp_path):
    cfg = load_config(None, [f"data.path={demo_dataset}", f"run.output_dir={tmp_path / 'run'}", *TINY])
    report = json.loads(Path(run_pipeline(cfg)).read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]

    # Every round trains the configured steps, whatever the size of its training set.
    assert [r["steps"] for r in rounds] == [6, 6]
    assert [r["images_seen"] for r in rounds] == [6 * 16, 6 * 16]
    assert rounds[1]["train_rows"] > rounds[0]["train_rows"]

    # The budget is a fraction of the pool; pseudo-labels come from the pool only. The labelled rows were
    # written once, in round 0's set; round 1's holds the pseudo-labels.
    manifest = read_manifest(demo_dataset)
    labels = label_split(demo_dataset, cfg.data, manifest)
    train = read_split(demo_dataset, "train", ["id", "label"])
    labeled_ids = set(train.filter(pa.array(labels.rule.chosen(train))).column("id").to_pylist())
    pool = {i for s in ("train", "unlabeled") for i in read_split(demo_dataset, s, ["id"]).column("id").to_pylist()}
    pool -= labeled_ids
    assert labels.pool_rows == len(pool) and rounds[1]["n_pseudo"] == budget_count(0.25, len(pool))
    labelled_set = pq.read_table(tmp_path / "run" / "round=0" / "trainset")
    assert set(labelled_set.column("id").to_pylist()) == labeled_ids
    pseudo_set = pq.read_table(tmp_path / "run" / "round=1" / "trainset")
    trainset = pa.concat_tables([labelled_set, pseudo_set])
    ids = trainset.column("id").to_pylist()
    pseudo = set(pseudo_set.column("id").to_pylist())
    assert len(pseudo) == rounds[1]["n_pseudo"] and pseudo <= pool
    assert rounds[1]["train_rows"] == len(labeled_ids) + len(pseudo)
    # A pseudo-label is the teacher's prediction (round 0's model over the pool), not the hidden truth.
    parts = sorted((tmp_path / "run" / "predictions" / "round=1").glob("part-*.parquet"))
    preds = pa.concat_tables([pq.read_table(p, columns=["id", "pred"]) for p in parts])
    pred_of = dict(zip(preds.column("id").to_pylist(), preds.column("pred").to_pylist()))
    assert [pred_of[i] for i in pseudo_set.column("id").to_pylist()] == pseudo_set.column("label").to_pylist()

    # Soft targets: one-hot for true labels, the teacher's sharpened probabilities for pseudo-labels.
    targets = np.array(trainset.column("target").to_pylist())
    assert np.allclose(targets.sum(1), 1.0, atol=1e-5)
    is_pseudo = np.array([i in pseudo for i in ids])
    assert set(np.unique(targets[~is_pseudo])) <= {0.0, 1.0}
    assert (targets[is_pseudo].max(1) < 1.0).any()
    assert (targets.argmax(1) == np.array(trainset.column("label").to_pylist())).all()

    # Which precision ran, as `precision: auto` resolves it on this machine's CPU.
    # One Train worker here: it takes every CPU of the machine (ray.torch_threads unset).
    want = {"device": "cpu", "precision": resolve_precision("auto", torch.device("cpu")), "channels_last": True,
            "cpu_bf16_units": cpu_has_bf16_units(), "torch_threads": node_cpus()}
    assert report["compute"] == {"pretrain": want, "finetune": want} and rounds[1]["compute"] == want
    assert f"finetune ran as**: {want['precision']} on cpu, channels_last" in (tmp_path / "run" / "report.md").read_text()

    # The best round by the configured metric, which is what the report says it used.
    assert report["run"]["select_metric"] == "balanced_accuracy"
    assert report["best_round"] == best_round([r["val"]["balanced_accuracy"] for r in rounds])

    # TensorBoard: every stage's curves in its own folder, the round summary in the run folder, equal to the
    # report's figures; report.md says where they are.
    run = tmp_path / "run"
    assert [step for step, _ in read_scalars(str(run / "pretrain"))["loss"]] == [0]
    for r in (0, 1):
        curves = read_scalars(str(run / f"round={r}"))
        assert [step for step, _ in curves["val_accuracy"]] == [3, 6]
        # The 2 Train workers validated a share of the val split each, the counts summed: the last step's figure
        # is the exported model's val accuracy as the pipeline measures it, in one process.
        assert curves["val_accuracy"][-1][1] == pytest.approx(rounds[r]["val"]["accuracy"])
        assert [step for step, _ in curves["loss"]] == [3, 6]
    summary = read_scalars(str(run))
    assert [s for s, _ in summary["rounds/val_accuracy"]] == [0, 1]
    assert [v for _, v in summary["rounds/val_accuracy"]] == pytest.approx([r["val"]["accuracy"] for r in rounds])
    assert [v for _, v in summary["rounds/n_pseudo"]] == [0, rounds[1]["n_pseudo"]]
    assert f"tensorboard --logdir {run}" in (run / "report.md").read_text()


def recording_finetune(monkeypatch, lrs: list[float] | None = None) -> list[str | None]:
    """Wrap ``finetune.run`` (the real one still trains) to record each round's initial weights (and, into
    ``lrs``, its learning rate)."""
    from raysemi.stages import finetune

    real, inits = finetune.run, []

    def run(cfg, trainset, init, *args, **kwargs):
        inits.append(init)
        if lrs is not None:
            lrs.append(cfg.finetune.lr)
        return real(cfg, trainset, init, *args, **kwargs)

    monkeypatch.setattr(finetune, "run", run)
    return inits


QUICK = [*TINY, "finetune.steps=2", "finetune.eval_every=2", "finetune.warmup_steps=0", "pseudolabel.soft_targets=false"]


def test_retrain_from_previous_and_resume_reuses_finished_rounds(ray_session, demo_dataset, tmp_path, monkeypatch):
    """Two rounds: each starts from the previous classifier at a tenth of the lr; round r uses r x budget
    pseudo-labels; the test split is evaluated on the round chosen on validation (made round 1 here, not the
    last); a resumed run trains nothing again."""
    from raysemi.pipeline import rounds
    from raysemi.pipeline import run as pipeline

    out = tmp_path / "run"
    cfg = load_config(None, [f"data.path={demo_dataset}", f"run.output_dir={out}", *QUICK, "pseudolabel.rounds=2",
                             "pseudolabel.retrain_from=previous", "pseudolabel.retrain_lr_scale=0.1"])
    lrs: list[float] = []
    inits = recording_finetune(monkeypatch, lrs)
    real_metrics, evaluated = pipeline.split_metrics, []

    def split_metrics(model, cfg, split, classes):
        evaluated.append((split, model))
        metrics = real_metrics(model, cfg, split, classes)
        if split == "val" and "round=1" in model:  # round 1 best on validation, round 2 (the last) worse
            metrics = {**metrics, "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}
        return metrics

    monkeypatch.setattr(pipeline, "split_metrics", split_metrics)  # test
    monkeypatch.setattr(rounds, "split_metrics", split_metrics)  # val, after each round
    first = json.loads(Path(run_pipeline(cfg)).read_text())
    byol = out / "pretrain" / "byol.safetensors"
    model = {r: str(out / f"round={r}" / "classifier.safetensors") for r in (0, 1, 2)}
    # Round 0 starts from the BYOL weights, each later round from the previous classifier (not from BYOL again),
    # at a tenth of the learning rate.
    assert inits == [str(byol), model[0], model[1]]
    assert lrs == pytest.approx([cfg.finetune.lr, 0.1 * cfg.finetune.lr, 0.1 * cfg.finetune.lr])
    # Cumulative budget: round r takes the r x budget most confident of the pool.
    labels = label_split(demo_dataset, cfg.data, read_manifest(demo_dataset))
    per_round = budget_count(cfg.pseudolabel.budget, labels.pool_rows)
    assert [r["n_pseudo"] for r in first["rounds"]] == [0, per_round, min(2 * per_round, labels.pool_rows)]
    # The test split is evaluated once, on the chosen round's model.
    assert first["best_round"] == 1 and first["run"]["best_model"] == model[1]
    assert [m for split, m in evaluated if split == "test"] == [model[1]]

    weights = {r: Path(model[r]).stat().st_mtime_ns for r in (0, 1, 2)}
    pretrained = byol.stat().st_mtime_ns
    inits.clear()
    again = json.loads(Path(run_pipeline(cfg, resume=True)).read_text())
    assert inits == []  # no round was trained again
    assert byol.stat().st_mtime_ns == pretrained
    assert {r: Path(model[r]).stat().st_mtime_ns for r in (0, 1, 2)} == weights
    assert [r["steps"] for r in again["rounds"]] == [r["steps"] for r in first["rounds"]] == [2, 2, 2]
    assert again["best_round"] == first["best_round"]
    assert [r["n_pseudo"] for r in again["rounds"]] == [r["n_pseudo"] for r in first["rounds"]]


@pytest.mark.parametrize("mode", ["supervised", "byol_finetune", "fixmatch"])
def test_baseline_modes_train_round_0_only(mode, ray_session, demo_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.path={demo_dataset}", f"run.output_dir={out}", *QUICK, f"run.mode={mode}"])
    inits = recording_finetune(monkeypatch)
    report = json.loads(Path(run_pipeline(cfg)).read_text())
    assert report["run"]["mode"] == mode
    assert [r["round"] for r in report["rounds"]] == [0] and report["best_round"] == 0  # rounds=1 is ignored
    assert not (out / "predictions").exists()
    if mode == "supervised":  # random init, no pretraining at all
        assert inits == [None] and not (out / "pretrain").exists() and "pretrain" not in report["stages"]
    else:
        assert inits == [str(out / "pretrain" / "byol.safetensors")] and report["stages"]["pretrain"] > 0
    assert report["test"]["accuracy"] is not None and (out / "report.md").is_file()
    metrics = json.loads((out / "round=0" / "finetune_metrics.json").read_text())
    pool_seen = sum(m.get("pool_images_seen", 0) for m in metrics)
    if mode == "fixmatch":  # the pool, ratio x the batch per step, beside the labelled rows
        assert pool_seen == sum(m["images_seen"] for m in metrics) * cfg.fixmatch.ratio > 0
        assert all(0 <= m["pool_mask_rate"] <= 1 for m in metrics)
    else:
        assert pool_seen == 0
