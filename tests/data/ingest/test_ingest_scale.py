"""Ingest at scale (#23 item 4): the same ids, splits and shards as ingest had before it was streamed and
spread over tasks (``fixtures/ingest_reference.json``, made by revision 58ff6dc from
``ingest_reference_input.make_input``), in this process, as Ray tasks and from an S3 source; the driver holds
a bounded window of the scan; the quarantine list is in ``quarantine.parquet``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raysemi.core import io as rio
from raysemi.data import shards
from raysemi.data.ingest import run as ingest_mod
from raysemi.data.ingest.run import ingest
from raysemi.data.shards import local_map
from tests.data.ingest.ingest_reference_input import make_input

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "ingest_reference.json").read_text())
CASES = {"folder": lambda pool: {"group_regex": r"^(person\d+)", "unlabeled": str(pool), "min_shards": 3,
                                 "shard_mb": 0.002},
         "defaults": lambda pool: {}}


def outcome(dest: str, m: shards.Manifest) -> dict:
    """What the reference recorded: every shard's rows in order, the quarantine, the counts."""
    return {
        "shards": {s: [shards.read_shard(u, ["source", "id", "label", "group"]).to_pydict()
                       for u in m.shard_uris(dest, s)] for s in m.splits},
        "quarantine": shards.read_quarantine(dest).to_pylist(), "duplicates": m.duplicates,
        "label_counts": {s: m.splits[s].label_counts for s in m.splits},
    }


@pytest.fixture(scope="module")
def reference_input(tmp_path_factory) -> tuple[Path, Path]:
    return make_input(tmp_path_factory.mktemp("ingest-reference"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_shards_as_before_in_small_chunks(reference_input, tmp_path, monkeypatch, case):
    src, pool = reference_input
    monkeypatch.setattr(ingest_mod, "CHUNK_ROWS", 7)  # many chunks, windows and buckets
    monkeypatch.setattr(ingest_mod, "IN_FLIGHT", 3)
    calls = []

    def counting_map(fn, args):
        if fn.__name__ == "stage_chunk":
            calls.append(sum(len(a[0]) for a in args))
        return local_map(fn, args)

    m = ingest(str(src), str(tmp_path / "ds"), progress=False, map_fn=counting_map, **CASES[case](pool))
    assert outcome(str(tmp_path / "ds"), m) == REFERENCE[case]
    # The driver handed out at most a window of the scan at a time, and every input once.
    assert max(calls) <= 7 * 3 and sum(calls) == m.extra["inputs"] > 7 * 3 * 3
    assert m.quarantined == shards.reason_counts(q["reason"] for q in REFERENCE[case]["quarantine"])
    left = {p.name for p in (tmp_path / "ds").iterdir()}
    assert "quarantine.parquet" in left and not [n for n in left if n.startswith("_staging-")]


@pytest.mark.ray
def test_same_shards_as_ray_tasks_and_from_s3(reference_input, tmp_path, s3_bucket, ray_session, monkeypatch):
    from raysemi.data.ingest import chunks as ingest_chunks
    from raysemi.data.ingest import validate
    from raysemi.distributed.ray_tasks import task_mapper

    def no_decoding_here(*args, **kwargs):
        raise AssertionError("the driver decoded an image")

    # Ray tasks run in worker processes: in this one (the driver) nothing is decoded nor read.
    for module in (ingest_chunks, validate):
        monkeypatch.setattr(module, "check_image", no_decoding_here)
    monkeypatch.setattr(ingest_chunks, "read_input", no_decoding_here)
    src, pool = reference_input
    m = ingest(str(src), str(tmp_path / "ds"), progress=False, map_fn=task_mapper(), **CASES["folder"](pool))
    assert outcome(str(tmp_path / "ds"), m) == REFERENCE["folder"]
    # The same source on S3 (images under a prefix, the pool under another): the same rows and shards.
    fs, root = rio.filesystem(s3_bucket)
    fs.put(str(src), f"{root}/in/src", recursive=True)
    fs.put(str(pool), f"{root}/in/pool", recursive=True)
    kw = {**CASES["folder"](pool), "unlabeled": f"{s3_bucket}/in/pool"}
    m = ingest(f"{s3_bucket}/in/src", f"{s3_bucket}/ds", progress=False, map_fn=task_mapper(), **kw)
    assert outcome(f"{s3_bucket}/ds", m) == REFERENCE["folder"]
    fs.invalidate_cache()
    assert not [p for p in fs.ls(f"{root}/ds", detail=False) if "_staging-" in p]


def test_csv_on_s3_with_a_missing_file(reference_input, tmp_path, s3_bucket):
    src, _ = reference_input
    fs, root = rio.filesystem(s3_bucket)
    fs.put(str(src / "covid"), f"{root}/csv/covid", recursive=True)
    names = sorted(p.name for p in (src / "covid").iterdir())
    lines = ["path,label"] + [f"covid/{n},c{i % 2}" for i, n in enumerate(names)]
    fs.pipe_file(f"{root}/csv/list.csv", "\n".join(lines).encode())
    m = ingest(f"{s3_bucket}/csv/list.csv", str(tmp_path / "ds"), progress=False, min_shards=1)
    assert m.extra["format"] == "csv" and m.classes == ["c0", "c1"]
    assert sum(s.rows for s in m.splits.values()) == len(names)
    fs.pipe_file(f"{root}/csv/list.csv", "\n".join([*lines, "covid/gone.png,c0"]).encode())
    with pytest.raises(shards.DatasetError, match="names 1 missing file"):
        ingest(f"{s3_bucket}/csv/list.csv", str(tmp_path / "ds2"), progress=False)
    assert not (tmp_path / "ds2" / "manifest.json").exists()


def test_a_failure_in_a_task_leaves_no_dataset_and_no_staging(reference_input, tmp_path, monkeypatch):
    from raysemi.data.ingest import chunks as ingest_chunks

    src, _ = reference_input

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ingest_chunks.shards, "write_shard", broken)
    with pytest.raises(shards.DatasetError, match="disk full"):
        ingest(str(src), str(tmp_path / "ds"), progress=False)
    left = sorted(p.name for p in (tmp_path / "ds").iterdir()) if (tmp_path / "ds").exists() else []
    assert "manifest.json" not in left and not [n for n in left if n.startswith("_staging-")]
    shutil.rmtree(tmp_path / "ds", ignore_errors=True)


def test_a_killed_ingests_staging_is_removed_and_nothing_else(reference_input, tmp_path):
    src, _ = reference_input
    dest = tmp_path / "ds"
    (dest / "_staging-0123abcd" / "staged").mkdir(parents=True)  # what a killed ingest leaves
    (dest / "_staging-0123abcd" / "staged" / "part-000000.parquet").write_bytes(b"partial")
    (dest / "_staging-notes").mkdir()  # the user's own folder, whatever its name
    (dest / "_staging-notes" / "x.txt").write_text("mine")
    m = ingest(str(src), str(dest), progress=False)
    assert m.splits["train"].rows > 0 and not (dest / "_staging-0123abcd").exists()
    assert (dest / "_staging-notes" / "x.txt").read_text() == "mine"
