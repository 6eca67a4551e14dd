"""`raysemi knn`: frozen-feature kNN of BYOL files against the random-init backbone they start from."""

from __future__ import annotations

import json

import pytest
import torch

from raysemi.commands.cli import main
from raysemi.core import io as rio
from raysemi.core.config import config_to_yaml, load_config
from raysemi.core.io import CheckpointError
from raysemi.data.shards import read_manifest
from raysemi.ml.knn import knn_accuracy
from raysemi.models.checkpoint import backbone_from_byol
from raysemi.stages import pretrain, probe

TINY = ["model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "model.pred_hidden_dim=64", "data.loader=torch", "data.num_threads=1", "pretrain.knn_k=5"]


def _save_byol(path, cfg, perturb: bool = False) -> str:
    torch.manual_seed(cfg.pretrain.seed)  # what the Train worker does before build_byol
    model = pretrain.build_byol(cfg)
    if perturb:
        with torch.no_grad():
            for p in model.online.backbone.parameters():
                p.add_(torch.randn_like(p))
    rio.save_weights(str(path), model.state_dict(), {"config": config_to_yaml(cfg)})
    return str(path)


def test_table_counts_and_the_unchanged_init_matches_random_init(tmp_path, demo_dataset):
    cfg = load_config(None, [*TINY, f"data.path={demo_dataset}"])
    same = _save_byol(tmp_path / "same.safetensors", cfg)
    perturbed = _save_byol(tmp_path / "perturbed.safetensors", cfg, perturb=True)
    rows = probe.knn_table(cfg, [same, perturbed], split="val")
    manifest = read_manifest(demo_dataset)
    assert [r["weights"] for r in rows] == [probe.RANDOM_INIT, same, perturbed]
    assert all(r["bank"] == manifest.splits["train"].labeled for r in rows)
    assert all(r["queries"] == manifest.splits["val"].labeled for r in rows)
    # The file holding the initial weights is loaded into the backbone exactly: same features, same votes.
    assert rows[1]["knn_accuracy"] == rows[0]["knn_accuracy"]
    features = [probe._features(cfg, b, manifest.shard_uris(demo_dataset, "val"))[0]
                for b in (probe.random_backbone(cfg), backbone_from_byol(cfg, perturbed))]
    assert not torch.allclose(*features, atol=1e-3)  # and another file is really used, not the init
    # Each row is the kNN of that file's features: the train split as the bank, the asked split as queries,
    # pretrain.knn_k neighbours (recomputed here from the features; a wrong split, k or file changes it).
    bank, bank_y = probe._features(cfg, backbone_from_byol(cfg, perturbed), manifest.shard_uris(demo_dataset, "train"))
    query, query_y = probe._features(cfg, backbone_from_byol(cfg, perturbed), manifest.shard_uris(demo_dataset, "val"))
    want = knn_accuracy(bank, bank_y, query, query_y, manifest.num_classes, cfg.pretrain.knn_k)
    assert rows[2]["knn_accuracy"] == want and rows[2]["k"] == 5


def test_a_file_of_another_backbone_is_refused(tmp_path, demo_dataset):
    cfg = load_config(None, [*TINY, f"data.path={demo_dataset}"])
    other = _save_byol(tmp_path / "other.safetensors", cfg.replace(**{"model.backbone": "resnet10t"}))
    with pytest.raises(CheckpointError, match="resnet10t"):
        probe.knn_table(cfg, [other])


def test_cli_prints_the_table_writes_json_and_fails_in_one_line(tmp_path, demo_dataset, capsys):
    cfg_args = [a for kv in [*TINY, f"data.path={demo_dataset}"] for a in ("--set", kv)]
    out = tmp_path / "knn.json"
    assert main(["knn", *cfg_args, "--split", "test", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| random init | test |" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["queries"] == read_manifest(demo_dataset).splits["test"].labeled

    assert main(["knn", *cfg_args, str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysemi knn: error:") and len(err.splitlines()) == 1
