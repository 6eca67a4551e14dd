"""``bench/scale.py`` on a tiny data set: every step runs and measures, its training sets hold what a round
chooses (the chosen labels; a quarter of the pool), ingest stores and predict predicts every image."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysemi.data.shards import read_manifest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
def test_every_step_runs_on_a_generated_set_and_reports_its_measures(ray_session, tmp_path):
    scale = _bench()
    root = str(tmp_path / "ds")
    scale.generate(root, 2500)
    manifest = read_manifest(root)
    assert manifest.splits["train"].rows == 2500 and len(manifest.splits["train"].shards) == 3
    assert 0.4 < manifest.splits["train"].labeled / 2500 < 0.6  # half labelled
    scale.image_folder(str(tmp_path / "work" / "images"), 60)  # ingest's and predict's source
    scale.image_folder(str(tmp_path / "work" / "images-warm"), 12, seed=1)
    for step in scale.STEPS:
        out = scale.run_step(step, root, str(tmp_path / "work"), None)
        assert out["step"] == step and out["seconds"] > 0 and out["input_shards"] == 3
        assert out["peak_rss_over_start_mib"] >= 0 and out["driver_s3_requests"] == 0
        assert out["task_maps"] >= (0 if step == "exactly-once check" else 1)
        # The markers at most (predict: the model too, hashed for the run record and for the commit markers,
        # and Ray's replies): every image read is a task's.
        model = (tmp_path / "work" / "tiny.safetensors").stat().st_size / 2**20 if step == "predict" else 0
        assert out["driver_bytes_read_mib"] < 1 + 3 * model, step
    # The training sets hold the chosen labels (10% of each class, at least one) and a quarter of the pool.
    labeled = manifest.splits["train"].labeled
    chosen = sum(-(-n // 10) for n in manifest.splits["train"].label_counts.values())
    assert pq.read_table(tmp_path / "work" / "labelled").num_rows == chosen
    assert pq.read_table(tmp_path / "work" / "pseudo").num_rows == round(0.25 * (2500 - labeled + labeled - chosen))
    # Ingest stored the 60 images (three classes, split by patient); predict predicted each of them.
    ingested = read_manifest(str(tmp_path / "work" / "ingested"))
    assert sum(sp.rows for sp in ingested.splits.values()) == 60 and ingested.classes == scale.CLASSES
    assert pq.read_table(tmp_path / "work" / "predicted" / "predictions.parquet").num_rows == 60
