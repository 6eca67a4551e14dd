"""``raysemi predict``: a folder with a corrupt image, an S3 prefix, a dataset split; a killed actor and a
rerun after a killed driver give the same result; bad input is refused before any actor starts."""

from __future__ import annotations

import io
import json
import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raysemi.commands import predict as predict_command
from raysemi.commands import predict_output
from raysemi.commands.cli import main
from raysemi.commands.predict_output import FAILED, PREDICTIONS, PREDICTIONS_CSV, SUMMARY, prediction_rows
from raysemi.core import io as rio
from raysemi.core.config import load_config
from raysemi.core.errors import RaysemiError
from raysemi.data import shards
from raysemi.data.ingest import validate
from raysemi.data.ingest.validate import check_image
from raysemi.data.inputs import staging
from raysemi.data.loading.augment import decode_rgb, eval_transform
from raysemi.data.shards import image_id, local_map, read_shard
from raysemi.models.checkpoint import load_classifier
from raysemi.stages import commits
from tests.procs import wait_for
from tests.stages.test_pseudolabel import (
    CLASSES,
    TINY,
    held_predictor,
    held_process,
    make_dataset,
    png,
    save_model,
)


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


@pytest.fixture(scope="module")
def model(cfg, tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("model") / "classifier.safetensors")
    save_model(uri, cfg, seed=0)
    return uri


def new_images(root: Path, n: int, seed: int = 0) -> dict[str, bytes]:
    """``n`` PNGs of two sizes, in ``root`` and ``root/later``; returns {relative path: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        rel = f"later/{i}.png" if i % 2 else f"{i}.png"
        files[rel] = png(rng, size=40 if i % 3 else 52)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def direct_probs(model_uri: str, images: list[bytes]) -> np.ndarray:
    """The classifier's probabilities for each image, by a plain forward pass in this process."""
    net, mcfg, _ = load_classifier(model_uri)
    t = eval_transform(mcfg.data.image_size, mcfg.augment)
    with torch.no_grad():
        return net(torch.stack([t(decode_rgb(b)) for b in images])).softmax(1).numpy()


def results(out: str) -> tuple:
    """What must be the same after a killed actor or a rerun: the tables and the deterministic summary."""
    summary = rio.read_json(rio.join(out, SUMMARY))
    summary.pop("run")
    table = pq.read_table(io.BytesIO(rio.read_bytes(rio.join(out, PREDICTIONS))))
    return table, rio.read_bytes(rio.join(out, PREDICTIONS_CSV)), rio.read_bytes(rio.join(out, FAILED)), summary


def prob_matrix(table) -> np.ndarray:
    return np.stack([table.column(f"prob_{c}").to_numpy() for c in CLASSES], axis=1)


@pytest.mark.ray
def test_folder_with_a_corrupt_image_a_killed_actor_and_a_rerun(ray_session, cfg, model, tmp_path):
    src = tmp_path / "new"
    files = new_images(src, 7)
    (src / "later" / "copy.png").write_bytes(files["0.png"])  # an exact copy: one prediction, two rows
    (src / "broken.png").write_bytes(files["2.png"][:70])
    (src / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")

    # 1. The actor predicting staged shard 3 is killed before it commits; Ray restarts it and redoes the shard.
    gate = tmp_path / "held"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(predict_command.run, cfg, model, str(src), out, progress=False,
                              predictor=held_predictor(3, gate))
        os.kill(wait_for(lambda: held_process(gate), running, what="the held actor"), signal.SIGKILL)
        summary = running.result(timeout=300)
    assert summary["run"]["actor_restarts"] == 1 and summary["run"]["actors"] == 2
    assert (summary["images"], summary["predicted"], summary["failed"], summary["ignored"]) == (9, 8, 1, 1)
    assert summary["run"]["shards"] == {"total": 7, "computed": 7, "reused": 0}
    assert sum(summary["per_class"].values()) == 8 and list(summary["per_class"]) == CLASSES

    table, csv_bytes, failed, _ = results(out)
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted([*files, "later/copy.png"]) and "broken.png" not in paths
    assert table.column_names == ["id", "path", "predicted", "confidence", *[f"prob_{c}" for c in CLASSES]]
    assert failed.decode().splitlines() == ['"path","reason"', '"broken.png","truncated"']
    # one row per image, the classifier's own probabilities
    probs = prob_matrix(table)
    want = direct_probs(model, [(src / p).read_bytes() for p in paths])
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert table.column("predicted").to_pylist() == [CLASSES[k] for k in want.argmax(1)]
    np.testing.assert_allclose(table.column("confidence").to_numpy(), want.max(1), atol=1e-5)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows["later/copy.png"]["id"] == rows["0.png"]["id"]
    low = int((table.column("confidence").to_numpy() < 0.5).sum())
    assert summary["low_confidence"] == low and summary["min_confidence"] == 0.5
    csv_table = pcsv.read_csv(io.BytesIO(csv_bytes))
    assert csv_table.column("path").to_pylist() == paths
    first = results(out)

    # 2. A second run into the same OUT is refused unless told.
    with pytest.raises(RaysemiError, match="already holds earlier predictions.*--resume"):
        predict_command.run(cfg, model, str(src), out, progress=False)

    # 3. A driver killed before the end: no result files, one staged chunk and one prediction commit lost.
    #    --resume stages that chunk again and predicts that shard only, and gives the same files.
    fs, _ = rio.filesystem(out)
    for name in (SUMMARY, PREDICTIONS, PREDICTIONS_CSV, FAILED):
        fs.rm(rio.join(out, name))
    fs.rm(rio.join(out, "inputs", "chunk-00004.json"))
    fs.rm(commits.marker_uri(rio.join(out, "predictions"), 5))
    again = predict_command.run(cfg, model, str(src), out, resume=True, actors=1, progress=False)
    assert again["run"]["shards"] == {"total": 7, "computed": 1, "reused": 6}
    assert again["run"]["inputs_chunks_reused"] == 8 and again["run"]["resumed"]
    assert results(out) == first

    # 4. Nothing lost: no actor starts, the same files again.
    fs.rm(rio.join(out, SUMMARY))
    third = predict_command.run(cfg, model, str(src), out, resume=True, progress=False)
    assert third["run"]["shards"] == {"total": 7, "computed": 0, "reused": 7}
    assert results(out) == first


@pytest.mark.ray
def test_s3_prefix_and_dataset_split(ray_session, s3_bucket, cfg, model, tmp_path, capsys):
    rng = np.random.default_rng(5)
    fs, _ = rio.filesystem(s3_bucket)
    images = {f"scans/day{i % 2}/{i}.png": png(rng) for i in range(5)}
    images["scans/bad.png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
    images["scans-other/x.png"] = png(rng)  # beside the prefix, not under it
    for key, data in images.items():
        fs.pipe(f"{s3_bucket}/{key}".removeprefix("s3://"), data)
    out = f"{s3_bucket}/out"
    code = main(["predict", model, f"{s3_bucket}/scans", out, "--quiet", *[a for o in TINY for a in ("--set", o)]])
    printed = capsys.readouterr().out
    assert code == 0 and "5 images predicted" in printed and "failed: 1" in printed
    table, _, failed, summary = results(out)
    assert summary["kind"] == "prefix" and (summary["predicted"], summary["failed"]) == (5, 1)
    assert table.column("path").to_pylist() == sorted(k.removeprefix("scans/") for k in images
                                                      if k.startswith("scans/day"))
    assert failed.decode().splitlines()[1].startswith('"bad.png","')
    want = direct_probs(model, [images[f"scans/{p}"] for p in table.column("path").to_pylist()])
    np.testing.assert_allclose(prob_matrix(table), want, atol=1e-5)

    # An ingested dataset: one split, the rows' own ids and sources, no staging.
    root = str(tmp_path / "ds")
    uris = make_dataset(root, shards=3, rows=3)
    dout = str(tmp_path / "dout")
    summary = predict_command.run(cfg, model, root, dout, split="unlabeled", actors=1, progress=False)
    assert summary["kind"] == "dataset" and summary["predicted"] == 6 and summary["failed"] == 0
    table = results(dout)[0]
    assert set(table.column("split").to_pylist()) == {"unlabeled"}
    want_ids = [i for u in uris[1:] for i in read_shard(u, ["id"]).column("id").to_pylist()]
    assert table.column("id").to_pylist() == want_ids
    assert not rio.exists(rio.join(dout, "inputs"))


def test_bad_input_is_refused_before_any_actor(cfg, model, tmp_path, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("an actor pool was started")

    monkeypatch.setattr(predict_command, "predict_shards", no_ray)
    monkeypatch.setattr(predict_command, "cluster_actors", no_ray)
    src = tmp_path / "new"
    new_images(src, 2)
    out = str(tmp_path / "out")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.csv").write_text("file\n0.png\n")
    root = str(tmp_path / "ds")
    make_dataset(root, shards=1, rows=1)
    cases = [
        ((str(tmp_path / "none.safetensors"), str(src), out), {}, "model .* does not exist"),
        ((str(bad), str(src), out), {}, "is not a raysemi classifier"),
        ((model, str(tmp_path / "empty"), out), {}, "no image files in"),
        ((model, str(tmp_path / "nowhere"), out), {}, "source .* does not exist"),
        ((model, str(tmp_path / "list.csv"), out), {}, "needs a header with a 'path' column"),
        ((model, root, out), {"split": "validation"}, "has no split 'validation'"),
        ((model, str(src), out), {"split": "test"}, "applies to an ingested dataset"),
        ((model, str(src), out), {"min_confidence": 1.5}, "not within 0..1"),
        ((model, str(src), str(src / "out")), {}, "is inside the source"),
    ]
    for args, kw, message in cases:
        with pytest.raises(RaysemiError, match=message):
            predict_command.run(cfg, *args, progress=False, **kw)
    assert not os.path.exists(out)

    # The CLI says it in one line, exit status 2.
    assert main(["predict", str(bad), str(src), out]) == 2

    # Only undecodable images: every one listed, no prediction, no actor.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"")
    (junk / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"x" * 40)
    summary = predict_command.run(cfg, model, str(junk), out, progress=False, mapper=local_map)
    assert (summary["predicted"], summary["failed"], summary["per_class"]) == (0, 2, dict.fromkeys(CLASSES, 0))
    assert results(out)[2].decode().splitlines()[1] == '"a.png","zero bytes"'
    # --resume with another source is refused; --overwrite replaces the earlier run.
    with pytest.raises(RaysemiError, match="holds predictions of another source"):
        predict_command.run(cfg, model, str(src), out, resume=True, progress=False)
    assert json.loads(Path(out, "run.json").read_text())["source"] == str(junk)
    # --overwrite replaces the earlier run and keeps the user's file in OUT; an OUT raysemi did not mark (the
    # user's own run.json, or an older raysemi's output) is refused, one line.
    Path(out, "my-notes.md").write_text("mine")
    summary = predict_command.run(cfg, model, str(junk), out, overwrite=True, progress=False, mapper=local_map)
    assert summary["failed"] == 2 and Path(out, "my-notes.md").read_text() == "mine"
    Path(out, ".raysemi-output").unlink()
    with pytest.raises(RaysemiError, match="holds earlier predictions \\(run.json\\) but no raysemi marker"):
        predict_command.run(cfg, model, str(junk), out, overwrite=True, progress=False)
    assert Path(out, "run.json").is_file() and Path(out, "my-notes.md").is_file()


def old_join(src: Path, paths: list[str], pred_out: str, model_sha: str) -> tuple:
    """The earlier in-memory result: every path read and checked here, joined with every prediction read back."""
    ids, reasons = [], []
    for p in paths:
        checked = check_image((src / p).read_bytes())
        ids.append(image_id((src / p).read_bytes()) if checked.ok else None)
        reasons.append(None if checked.ok else checked.reason)
    index = pa.table({"path": paths, "id": pa.array(ids, pa.string()), "reason": pa.array(reasons, pa.string())})
    preds = commits.read_predictions(pred_out, model_sha)
    bad = index.filter(pc.is_null(index.column("id")))
    return prediction_rows(index, preds, CLASSES), [(p, r) for p, r in zip(bad.column("path").to_pylist(),
                                                                          bad.column("reason").to_pylist())]


@pytest.mark.ray
def test_driver_reads_no_image_and_the_streamed_output_is_the_in_memory_join(ray_session, cfg, model, tmp_path,
                                                                              monkeypatch):
    """41 files in 14 chunks over 7 staging tasks and 5 dedup buckets, with exact copies within and across
    chunks and three failures: the driver never reads, decodes or checks an image (all that is patched to fail
    in this process; the tasks and actors run in others), and the files are the earlier in-memory join's."""
    src = tmp_path / "new"
    src.mkdir()
    rng = np.random.default_rng(3)
    distinct = [png(rng, size=36) for _ in range(20)]
    for i in range(38):
        (src / f"{i:02d}.png").write_bytes(distinct[(i * 7) % 20] if i % 4 else distinct[i % 20])
    (src / "38.png").write_bytes(distinct[0][:90])
    (src / "39.jpg").write_bytes(b"")
    (src / "40.png").write_bytes(b"not a png at all")
    out = str(tmp_path / "out")

    def banned(*a, **k):
        raise AssertionError("the driver read or decoded an image")

    real_read, real_sha = rio.read_bytes, rio.file_sha256
    monkeypatch.setattr(staging, "GROUP_ROWS", 6)
    monkeypatch.setattr(staging, "BUCKET_ROWS", 10)
    for target, name in ((staging, "check_image"), (staging, "read_image"), (validate, "check_image"),
                         (Image, "open"), (shards, "read_shard"), (predict_output, "read_shard")):
        monkeypatch.setattr(target, name, banned)
    monkeypatch.setattr(rio, "read_bytes", lambda u: banned() if u.endswith((".png", ".jpg")) else real_read(u))
    monkeypatch.setattr(rio, "file_sha256", lambda u: banned() if "part-" in u else real_sha(u))
    summary = predict_command.run(cfg, model, str(src), out, actors=2, progress=False)
    monkeypatch.undo()

    assert (summary["images"], summary["predicted"], summary["failed"]) == (41, 38, 3)
    pred_out = rio.join(out, "predictions")
    stored = commits.read_predictions(pred_out).column("id").to_pylist()
    assert len(stored) == len(set(stored)) == 20  # every stored id once
    table, csv_bytes, failed, counted = results(out)
    paths = sorted(p.name for p in src.iterdir())
    want, want_failed = old_join(src, paths, pred_out, summary["model_sha256"])
    assert table.equals(want)
    first_chunk: dict[str, int] = {}  # 41 images: chunks of 3; a shard per chunk holding a first occurrence
    for k, p in enumerate(paths):
        i = dict(zip(want.column("path").to_pylist(), want.column("id").to_pylist())).get(p)
        if i is not None:
            first_chunk.setdefault(i, k // 3)
    assert summary["run"]["shards"]["total"] == len(set(first_chunk.values())) < 14
    assert pcsv.read_csv(io.BytesIO(csv_bytes)).column("path").to_pylist() == want.column("path").to_pylist()
    assert [tuple(r.split(",")) for r in failed.decode().splitlines()[1:]] == [(f'"{p}"', f'"{r}"')
                                                                               for p, r in want_failed]
    per = Counter(want.column("predicted").to_pylist())
    assert counted["per_class"] == {c: per.get(c, 0) for c in CLASSES}
    assert counted["low_confidence"] == int((want.column("confidence").to_numpy() < 0.5).sum())
    assert counted["failed_reasons"] == dict(Counter(r.split(":")[0] for _, r in want_failed).most_common())
    assert not rio.exists(rio.join(out, "results"))
