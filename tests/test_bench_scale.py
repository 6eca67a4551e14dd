"""``bench/scale.py`` on a tiny data set: every step runs and measures, and its inputs are what a round sees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq

from raysemi.data.shards import read_manifest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_step_runs_on_a_generated_set_and_reports_its_measures(tmp_path):
    scale = _bench()
    root = str(tmp_path / "ds")
    scale.generate(root, 2500)
    manifest = read_manifest(root)
    assert manifest.splits["train"].rows == 2500 and len(manifest.splits["train"].shards) == 3
    assert 0.4 < manifest.splits["train"].labeled / 2500 < 0.6  # half labelled
    for step in scale.STEPS:
        out = scale.run_step(step, root, str(tmp_path / "work"), None)
        assert out["step"] == step and out["seconds"] > 0 and out["input_shards"] == 3
        assert out["peak_rss_over_start_mib"] >= 0 and out["s3_requests"] == 0
    # The training set holds the chosen labels (10% of each class, at least one) and a quarter of the pool.
    rows = pq.read_table(tmp_path / "work" / "trainset").num_rows
    labeled = manifest.splits["train"].labeled
    pool = 2500 - labeled + labeled - sum(-(-n // 10) for n in manifest.splits["train"].label_counts.values())
    assert rows == round(0.25 * pool) + (2500 - pool)
