"""The pseudo-label actor pool: commits, skipping on re-run, exactly-once with an actor killed, S3."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from raysemi.core import io as rio
from raysemi.core.config import load_config
from raysemi.core.errors import RaysemiError
from raysemi.core.io import filesystem, join
from raysemi.data.shards import (
    SCHEMA,
    Manifest,
    SplitInfo,
    image_id,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)
from raysemi.models.checkpoint import build_classifier, save_classifier
from raysemi.stages import commits, predictor
from raysemi.stages import pseudolabel as pl
from tests.procs import pids_titled, wait_for

CLASSES = ["normal", "pneumonia", "covid"]
TINY = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=32", "model.proj_dim=16",
    "data.image_size=32", "data.loader=torch", "pseudolabel.num_actors=2", "pseudolabel.batch_size=4",
]


def png(rng: np.random.Generator, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def make_dataset(root: str, shards: int, rows: int, seed: int = 0) -> list[str]:
    """One labeled train shard and ``shards - 1`` unlabeled ones; returns the shard URIs in order."""
    rng = np.random.default_rng(seed)
    splits: dict[str, SplitInfo] = {}
    uris = []
    for k in range(shards):
        split = "train" if k == 0 else "unlabeled"
        images = [png(rng) for _ in range(rows)]
        labels = [int(i % 3) for i in range(rows)] if split == "train" else [None] * rows
        table = pa.table(
            {
                "id": [image_id(b) for b in images],
                "image": images,
                "label": pa.array(labels, pa.int16()),
                "group": pa.array([None] * rows, pa.string()),
                "source": [f"gen/{k}/{i}.png" for i in range(rows)],
            },
            schema=SCHEMA,
        )
        info = splits.setdefault(split, SplitInfo())
        part = f"{split}/part-{len(info.shards):05d}.parquet"
        info.shards.append(write_shard(root, part, table))
        info.rows += rows
        uris.append(join(root, part))
    write_manifest(root, Manifest(classes=CLASSES, splits=splits, synthetic=True))
    return uris


def save_model(uri: str, cfg, seed: int) -> str:
    torch.manual_seed(seed)
    return save_classifier(uri, build_classifier(cfg, len(CLASSES)), cfg, CLASSES)


def held_predictor(index: int, gate):
    """A ``ShardPredictor`` whose first process to get shard ``index`` writes ``gate`` and then holds it
    (never commits), so that the test can kill that process from outside; a restarted one runs normally."""

    class HeldPredictor(predictor.ShardPredictor):
        def run(self, i, shard_uri, out_uri, rows, *rest):
            if i == index and not os.path.exists(gate):
                with open(gate, "w") as fh:
                    fh.write("held")
                time.sleep(120)  # killed long before; if not, the test's timeout says so
            return super().run(i, shard_uri, out_uri, rows, *rest)

    return HeldPredictor


def held_process(gate) -> int | None:
    """The actor process holding shard ``index``: the one Ray titles ``HeldPredictor.run`` once the gate
    exists (the other actors' tasks last milliseconds, so it is the one still in ``run`` a moment later)."""
    if not os.path.exists(gate):
        return None
    seen = []
    for _ in range(3):
        seen.append(pids_titled("HeldPredictor.run"))
        time.sleep(0.3)
    steady = set.intersection(*seen)
    return steady.pop() if len(steady) == 1 else None


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


@pytest.mark.ray
def test_exactly_once_with_a_killed_actor_and_after_an_interrupted_run(
    ray_session, s3_bucket, cfg, tmp_path
):
    """All on S3 (the cluster case). Actor start-up dominates on 2 cores, so one test covers both."""
    uris = make_dataset(f"{s3_bucket}/dataset", shards=6, rows=6)
    model = f"{s3_bucket}/models/classifier.safetensors"
    sha = save_model(model, cfg, seed=0)
    out = f"{s3_bucket}/predictions/round=1"
    fs, _ = filesystem(out)

    # 1. The test kills the process of the actor predicting shard 3 before it commits: Ray restarts the actor
    # and re-runs the shard on it.
    gate = tmp_path / "held"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(pl.predict_shards, model, uris, out, cfg, progress=False,
                              predictor=held_predictor(3, gate))
        victim = wait_for(lambda: held_process(gate), running, what="the held actor")
        os.kill(victim, signal.SIGKILL)
        first = running.result(timeout=300)
    assert first.actor_restarts == 1
    assert (first.shards_total, first.shards_computed, first.shards_skipped, first.rows) == (6, 6, 0, 36)
    assert first.model_sha256 == sha and first.images_per_s > 0
    marker = json.loads(fs.cat(commits.marker_uri(out, 3)))
    assert marker["model_sha256"] == sha and marker["rows"] == 6 and marker["input"] == uris[3]

    preds = commits.read_predictions(out)
    assert preds.schema == commits.PRED_SCHEMA
    ids = preds.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 36
    assert set(ids) == {i for u in uris for i in read_shard(u, ["id"]).column("id").to_pylist()}
    probs = np.array(preds.column("probs").to_pylist(), dtype=np.float32)
    assert probs.shape == (36, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(preds.column("pred").to_numpy(), probs.argmax(1))
    np.testing.assert_allclose(preds.column("confidence").to_numpy(), probs.max(1))
    # The actors give what one process gives with the same model and eval transform, in row order.
    local = predictor.ShardPredictor(model, cfg, sha).predict_table(uris[2])
    got = preds.slice(12, 6)
    assert got.column("id").to_pylist() == local.column("id").to_pylist()
    np.testing.assert_allclose(got.column("confidence").to_numpy(), local.column("confidence").to_numpy(), rtol=1e-5)

    # 2. An interrupted run: shard 1 lost its marker, shard 4 its Parquet file. Only those two are recomputed.
    before = {i: fs.cat(commits.marker_uri(out, i)) for i in (0, 2, 3, 5)}
    fs.rm(commits.marker_uri(out, 1))
    fs.rm(commits.part_uri(out, 4))
    one_actor = cfg.replace(**{"pseudolabel.num_actors": 1})  # two small shards: one actor to start, not two
    second = pl.predict_shards(model, uris, out, one_actor, progress=False)
    assert (second.shards_computed, second.shards_skipped, second.rows, second.actor_restarts) == (2, 4, 36, 0)
    assert {i: fs.cat(commits.marker_uri(out, i)) for i in (0, 2, 3, 5)} == before, "a committed shard was redone"
    assert commits.read_predictions(out).column("id").to_pylist() == ids

    # 3. Nothing missing: no actor starts. A different model file: every shard is pending again.
    third = pl.predict_shards(model, uris, out, cfg, progress=False)
    assert (third.shards_computed, third.shards_skipped, third.images_per_s) == (0, 6, 0.0)
    rows = [6] * 6
    assert commits.pending_shards(out, uris, rows, sha) == []
    assert [t[0] for t in commits.pending_shards(out, uris, rows, "another model's sha256")] == list(range(6))
    assert commits.read_predictions(out, model_sha256="another model's sha256").num_rows == 0

    # 4. A shorter input list: parts beyond it are removed, so the folder holds predictions of these inputs only.
    fourth = pl.predict_shards(model, uris[:4], out, cfg, progress=False)
    assert (fourth.shards_computed, fourth.rows) == (0, 24)
    assert commits.read_predictions(out).num_rows == 24


def failing_predictor(flags, times: int):
    """A ``ShardPredictor`` whose first ``times`` tasks of every shard raise (a passing S3 error)."""

    class FailingPredictor(predictor.ShardPredictor):
        def run(self, i, shard_uri, out_uri, rows, *rest):
            tries = len(list(flags.glob(f"{i}-*")))
            if tries < times:
                (flags / f"{i}-{tries}").write_text("failed")
                raise OSError(f"S3 hiccup on shard {i}")
            return super().run(i, shard_uri, out_uri, rows, *rest)

    return FailingPredictor


@pytest.mark.ray
def test_a_failed_task_is_retried_a_bounded_number_of_times(ray_session, cfg, tmp_path):
    uris = make_dataset(str(tmp_path / "ds"), shards=2, rows=3)
    model = str(tmp_path / "model.safetensors")
    save_model(model, cfg, seed=0)
    one_actor = cfg.replace(**{"pseudolabel.num_actors": 1})
    flags = tmp_path / "once"
    flags.mkdir()
    result = pl.predict_shards(model, uris, str(tmp_path / "pred"), one_actor, progress=False,
                               predictor=failing_predictor(flags, 1))
    assert (result.shards_computed, result.rows, result.actor_restarts) == (2, 6, 0)
    assert sorted(p.name for p in flags.iterdir()) == ["0-0", "1-0"]  # each shard failed once, then passed

    flags = tmp_path / "always"
    flags.mkdir()
    with pytest.raises(RaysemiError, match=f"failed {pl.TASK_ATTEMPTS} times: .*S3 hiccup on shard 0") as err:
        pl.predict_shards(model, uris[:1], str(tmp_path / "pred2"), one_actor, progress=False,
                          predictor=failing_predictor(flags, 99))
    assert "\n" not in str(err.value)
    assert len(list(flags.iterdir())) == pl.TASK_ATTEMPTS


@pytest.mark.ray
def test_inputs_swapped_under_the_same_names_are_recomputed(ray_session, cfg, tmp_path):
    uris = make_dataset(str(tmp_path / "ds"), shards=3, rows=3)
    model = str(tmp_path / "model.safetensors")
    sha = save_model(model, cfg, seed=0)
    out = str(tmp_path / "pred")
    one_actor = cfg.replace(**{"pseudolabel.num_actors": 1})
    assert pl.predict_shards(model, uris, out, one_actor, progress=False).shards_computed == 3
    marker = json.loads(Path(commits.marker_uri(out, 1)).read_text())
    assert marker["input_sha256"] == rio.file_sha256(uris[1])

    a, b = uris[1], uris[2]  # the two files trade places; same names, same row counts
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    again = pl.predict_shards(model, uris, out, one_actor, progress=False)
    assert (again.shards_computed, again.shards_skipped, again.rows) == (2, 1, 9)
    for i in (1, 2):  # each part now predicts the content under its input's name
        assert read_shard(commits.part_uri(out, i), ["id"]).column("id").to_pylist() == \
            read_shard(uris[i], ["id"]).column("id").to_pylist()
    # A manifest's hashes, when given, decide without reading the inputs; other content: pending, not fatal.
    hashes = [rio.file_sha256(u) for u in uris]
    assert commits.pending_shards(out, uris, [3, 3, 3], sha, hashes) == []
    assert [t[0] for t in commits.pending_shards(out, uris, [3, 3, 3], sha, [hashes[0], "other", hashes[2]])] == [1]


def test_model_is_checked_before_any_actor_starts(tmp_path, cfg):
    uris = make_dataset(str(tmp_path / "ds"), shards=1, rows=2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RaysemiError, match="is not a raysemi classifier"):
        pl.predict_shards(str(bad), uris, str(tmp_path / "pred"), cfg, progress=False)
    with pytest.raises(RaysemiError, match="does not exist"):
        pl.predict_shards(str(tmp_path / "missing.safetensors"), uris, str(tmp_path / "pred"), cfg)
    good = str(tmp_path / "good.safetensors")
    save_model(good, cfg, seed=0)
    assert predictor.model_classes(good) == CLASSES
    with pytest.raises(RaysemiError, match="input shard missing"):
        pl.predict_shards(good, [str(tmp_path / "nope.parquet")], str(tmp_path / "pred"), cfg)


def test_local_predictor_writes_a_committed_shard(tmp_path, cfg):
    """The actor's work, in this process: predict, commit, and the exactly-once check (local disk)."""
    uris = make_dataset(str(tmp_path / "ds"), shards=2, rows=5)
    model = str(tmp_path / "model.safetensors")
    sha = save_model(model, cfg, seed=0)
    out = str(tmp_path / "pred")
    sp = predictor.ShardPredictor(model, cfg.replace(**{"pseudolabel.batch_size": 3}), sha)
    assert [sp.run(i, u, out, 5)[0] for i, u in enumerate(uris)] == [5, 5]
    assert commits.verify_exactly_once(out, uris) == 10
    assert commits.pending_shards(out, uris, [5, 5], sha) == []
    table = commits.read_predictions(out)
    assert table.num_rows == 10 and table.column("pred").type == pa.int16()
    with pytest.raises(RuntimeError, match="holds 4"):
        sp.run(0, uris[0], out, 4)


def _fake(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table(
        {"id": ids, "pred": pa.array([0] * n, pa.int16()), "confidence": pa.array([0.5] * n, pa.float32()),
         "probs": pa.array([[0.5, 0.5]] * n, pa.list_(pa.float32()))},
        schema=commits.PRED_SCHEMA,
    )


def test_exactly_once_check_catches_violations(tmp_path):
    root = str(tmp_path / "ds")
    uris = make_dataset(root, shards=2, rows=3)
    ids = [read_shard(u, ["id"]).column("id") for u in uris]
    out = str(tmp_path / "pred")
    commits.commit(out, 0, uris[0], _fake(ids[0].to_pylist()), "sha", input_ids=ids[0])
    commits.commit(out, 1, uris[1], _fake(ids[1].to_pylist()), "sha", input_ids=ids[1])
    assert commits.verify_exactly_once(out, uris) == 6
    assert commits.is_committed(out, 1, uris[1], 3, "sha") and not commits.is_committed(out, 1, uris[1], 3, "other")

    # The shard's own check, at commit: a duplicate and a missing id (or another order) never commit.
    before = Path(commits.marker_uri(out, 1)).read_bytes()
    wrong = [ids[1][0].as_py(), ids[1][1].as_py(), ids[0][0].as_py()]
    with pytest.raises(RaysemiError, match="do not hold its ids in order"):
        commits.commit(out, 1, uris[1], _fake(wrong), "sha", input_ids=ids[1])
    assert Path(commits.marker_uri(out, 1)).read_bytes() == before
    commits.commit(out, 1, uris[1], _fake(ids[1].to_pylist()[:2]), "sha", input_ids=ids[1].slice(0, 2))
    with pytest.raises(RaysemiError, match="holds 2 rows"):
        commits.verify_exactly_once(out, uris)
    commits.commit(out, 1, uris[1], _fake(ids[1].to_pylist()), "sha")  # no id check: not trusted
    with pytest.raises(RaysemiError, match="without its id check"):
        commits.verify_exactly_once(out, uris)
    os.remove(commits.part_uri(out, 1))
    with pytest.raises(RaysemiError, match="no prediction shard"):
        commits.verify_exactly_once(out, uris)


@pytest.mark.ray
def test_raysemi_pseudolabel_writes_the_selection_of_the_pool(ray_session, demo_dataset, cfg, tmp_path):
    """``raysemi pseudolabel``: the pool's predictions, then the budget chosen by tasks into ``selected/``: the
    rows the in-memory selection picks from the same predictions."""
    from raysemi.data.labels import label_split
    from raysemi.data.synthetic import class_names
    from raysemi.pipeline.run import pseudolabel_only
    from raysemi.stages.pool import pool_shards
    from raysemi.stages.selection import selection_prior
    from tests.stages.test_selection import select_pseudo_labels

    run = cfg.replace(**{"data.path": demo_dataset, "data.label_fraction": 0.2, "pseudolabel.budget": 0.3,
                         "pseudolabel.selection": "prior", "pseudolabel.num_actors": 1})
    model = str(tmp_path / "model.safetensors")
    torch.manual_seed(0)
    save_classifier(model, build_classifier(run, 3), run, class_names(3))
    out = str(tmp_path / "pl")
    message = pseudolabel_only(run, model, out)
    got = pa.concat_tables([read_shard(str(p)) for p in sorted((tmp_path / "pl" / "selected").glob("part-*.parquet"))])

    manifest = read_manifest(demo_dataset)
    labels = label_split(demo_dataset, run.data, manifest)
    pool_ids = set()
    for shard in pool_shards(demo_dataset, manifest):
        t = read_shard(shard.uri, ["id", "label"])
        pool_ids |= set(t.filter(pa.array(labels.rule.pool(t, shard.split))).column("id").to_pylist())
    budget = round(0.3 * labels.pool_rows)
    want = select_pseudo_labels(commits.read_predictions(out), pool_ids, budget, 3,
                                prior=selection_prior("prior", labels.labeled_counts))
    assert sorted(got.column("id").to_pylist()) == sorted(want.column("id").to_pylist())
    assert got.num_rows == budget and f"{budget} selected" in message
