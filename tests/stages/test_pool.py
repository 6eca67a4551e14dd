"""A round's pseudo-labels chosen shard by shard: the same rows, precision and soft targets as the in-memory
selection over all predictions; on the cluster the driver reads no image and few S3 requests per shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysemi.core.config import DataConfig
from raysemi.core.io import filesystem, join
from raysemi.data.labels import label_split
from raysemi.data.shards import (
    SCHEMA,
    Manifest,
    SplitInfo,
    local_map,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)
from raysemi.data.trainset import count_rows, write_trainset
from raysemi.distributed import ray_tasks
from raysemi.ml.losses import sharpen
from raysemi.ml.metrics import pseudo_label_precision
from raysemi.stages import commits, pool
from raysemi.stages.selection import selection_prior
from tests.stages.test_selection import select_pseudo_labels

CLASSES = ["a", "b", "c"]


def make_round(root: str, rows: int, per_shard: int, seed: int = 0) -> str:
    """A dataset (train half labelled, an unlabeled split, val/test) and committed predictions of every pool
    shard, with many tied confidences; returns the predictions' URI."""
    rng = np.random.default_rng(seed)
    splits, pred_uri, index = {}, join(root, "predictions"), 0
    for split, n in (("train", rows), ("unlabeled", rows // 3), ("val", 3), ("test", 3)):
        info = SplitInfo(label_counts=dict.fromkeys(CLASSES, 0) if split != "unlabeled" else {})
        for k, start in enumerate(range(0, n, per_shard)):
            m = min(per_shard, n - start)
            ids = [f"{split}{seed}-{start + i:07d}" for i in range(m)]
            y = rng.integers(0, 3, m)
            keep = rng.random(m) < 0.5 if split == "train" else np.full(m, split != "unlabeled")
            table = pa.table({"id": ids, "image": [f"img-{i}".encode() for i in ids],
                              "label": pa.array([int(a) if b else None for a, b in zip(y, keep)], pa.int16()),
                              "group": pa.array([None] * m, pa.string()), "source": ids}, schema=SCHEMA)
            shard = write_shard(root, f"{split}/part-{k:05d}.parquet", table)
            info.shards.append(shard)
            info.rows += m
            info.labeled += int(keep.sum())
            for c in y[keep]:
                info.label_counts[CLASSES[int(c)]] += 1
            if split in pool.POOL_SPLITS:
                logits = rng.integers(0, 6, (m, 3)).astype(np.float32)  # coarse: confidences tie often
                probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
                preds = pa.table({"id": ids, "pred": pa.array(probs.argmax(1), pa.int16()),
                                  "confidence": pa.array(probs.max(1), pa.float32()),
                                  "probs": pa.array(list(probs), pa.list_(pa.float32()))})
                commits.commit(pred_uri, index, join(root, shard.path), preds, "m" * 64, shard.sha256,
                               input_ids=table.column("id"))
                index += 1
        splits[split] = info
    write_manifest(root, Manifest(classes=CLASSES, splits=splits, synthetic=True))
    return pred_uri


def in_memory(root: str, pred_uri: str, data: DataConfig, budget: int, selection: str, min_conf: float):
    """What the round chose when every id lived in the driver: the pool as a set, one sort of all predictions."""
    manifest = read_manifest(root)
    split = label_split(root, data, manifest)
    pool_ids, truth = set(), {}
    for shard in pool.pool_shards(root, manifest):
        t = read_shard(shard.uri, ["id", "label"])
        mask = split.rule.pool(t, shard.split)
        pool_ids |= set(t.filter(pa.array(mask)).column("id").to_pylist())
        if shard.split == "train":
            hidden = t.filter(pa.array(mask & np.asarray(t.column("label").is_valid())))
            truth.update(zip(hidden.column("id").to_pylist(), hidden.column("label").to_pylist()))
    preds = commits.read_predictions(pred_uri)
    chosen = select_pseudo_labels(preds, pool_ids, budget, 3, prior=selection_prior(selection, split.labeled_counts),
                                  min_confidence=min_conf)
    return split, chosen, truth, preds


@pytest.mark.parametrize("selection,budget,min_conf", [("prior", 700, 0.0), ("top", 333, 0.0),
                                                       ("balanced", 5000, 0.45)])
def test_shard_by_shard_chooses_the_rows_the_full_sort_chose(tmp_path, selection, budget, min_conf):
    root = str(tmp_path / "ds")
    pred_uri = make_round(root, rows=3000, per_shard=400)
    data = DataConfig(path=root, label_fraction=0.2)
    split, want, truth, preds = in_memory(root, pred_uri, data, budget, selection, min_conf)

    manifest = read_manifest(root)
    shards = pool.pool_shards(root, manifest, pred_uri)
    view = pool.PoolView(split.rule, 3, min_conf)
    rule, candidates = pool.select(shards, view, budget, selection_prior(selection, split.labeled_counts), local_map)
    source = pool.PseudoRows(view, rule, weight=0.5, temperature=0.5)
    counted = count_rows(source, shards)
    ts = write_trainset(source, shards, str(tmp_path / "ts"), 4, soft=True, counted=counted)

    got = pq.read_table(str(tmp_path / "ts"))
    assert sorted(got.column("id").to_pylist()) == sorted(want.column("id").to_pylist())
    assert ts.total == want.num_rows == min(budget, sum(candidates)) and len(ts.uris) == 4
    by_id = {r["id"]: r for r in preds.to_pylist()}
    assert all(r["label"] == by_id[r["id"]]["pred"] and r["weight"] == 0.5 for r in got.to_pylist())
    probs = torch.tensor([by_id[i]["probs"] for i in got.column("id").to_pylist()], dtype=torch.float64)
    np.testing.assert_allclose(np.array(got.column("target").to_pylist()), sharpen(probs, 0.5).numpy(), atol=1e-6)
    ids = want.column("id").to_pylist()
    ref = pseudo_label_precision(np.array([truth.get(i, -1) for i in ids]), want.column("pred").to_numpy(), CLASSES)
    assert pool.precision(counted[2], CLASSES) == ref
    assert ts.class_counts == np.bincount(want.column("pred").to_numpy(), minlength=3).tolist()


class DriverReads:
    """Counts the Parquet reads made in this process, and fails on any that takes the image column."""

    def __init__(self, monkeypatch):
        self.reads = 0
        real_table, real_groups = pq.read_table, pq.ParquetFile.read_row_groups

        def read_table(source, *args, columns=None, **kwargs):
            self._check(columns)
            return real_table(source, *args, columns=columns, **kwargs)

        def read_row_groups(pf, groups, columns=None, **kwargs):
            self._check(columns)
            return real_groups(pf, groups, columns=columns, **kwargs)

        monkeypatch.setattr(pq, "read_table", read_table)
        monkeypatch.setattr(pq.ParquetFile, "read_row_groups", read_row_groups)

    def _check(self, columns):
        self.reads += 1
        assert columns is not None and "image" not in columns, f"the driver read the image column ({columns})"


class S3Requests:
    """Counts the S3 requests this process sends (botocore's before-send event), per kind."""

    def __init__(self, uri: str):
        self.sent: list[str] = []
        fs, _ = filesystem(uri)
        fs.s3.meta.events.register("before-send.s3", lambda request, **kw: self.sent.append(request.method))


@pytest.mark.ray
def test_on_the_cluster_the_driver_reads_no_image_and_few_requests_per_shard(ray_session, s3_bucket, tmp_path,
                                                                              monkeypatch):
    root = f"{s3_bucket}/ds"
    pred_uri = make_round(root, rows=1200, per_shard=100)
    manifest = read_manifest(root)
    split = label_split(root, DataConfig(path=root, label_fraction=0.1), manifest, ray_tasks.task_mapper())
    shards = pool.pool_shards(root, manifest, pred_uri)
    tasks = ray_tasks.task_mapper()
    reads, requests = DriverReads(monkeypatch), S3Requests(root)

    # A round's driver side after the actors committed: the pending check, the exactly-once check from the
    # markers, the selection's passes, the counts and the training-set parts, all run as Ray tasks.
    uris, rows = [s.uri for s in shards], [s.rows for s in shards]
    hashes = [h for sp in pool.POOL_SPLITS for h in manifest.shard_hashes(sp)]
    assert commits.pending_shards(pred_uri, uris, rows, "m" * 64, hashes) == []
    assert commits.verify_exactly_once(pred_uri, uris, rows) == sum(rows)
    view = pool.PoolView(split.rule, 3, 0.0)
    rule, _ = pool.select(shards, view, 300, [1.0, 1.0, 1.0], tasks)
    source = pool.PseudoRows(view, rule, 1.0)
    ts = write_trainset(source, shards, f"{s3_bucket}/ts", 4, tasks, counted=count_rows(source, shards, tasks))

    assert ts.total == 300
    assert reads.reads == 0  # every Parquet read ran in a task
    per_shard = len(requests.sent) / len(shards)
    assert per_shard <= 3, f"{len(requests.sent)} requests for {len(shards)} shards: {requests.sent}"
