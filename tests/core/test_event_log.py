"""TensorBoard event files: what is logged reads back, locally and on the S3 server, and a restart adds a file."""

from __future__ import annotations

import math

import pytest

from raysemi.core.event_log import EventLog, clear_events, copy_events, event_files, read_scalars


@pytest.mark.parametrize("where", ["local", "s3"])
def test_scalars_read_back_and_a_second_writer_adds_a_file(where, tmp_path, request):
    uri = str(tmp_path / "stage") if where == "local" else request.getfixturevalue("s3_bucket") + "/run/stage"
    with EventLog(uri, suffix=".a") as ev:
        ev.log(0, {"loss": 2.5, "val_accuracy": 0.5, "epoch": 0, "resumed": True, "name": "x", "bad": math.nan})
        # Written through before close: a stage's curves appear while it runs.
        assert read_scalars(uri)["loss"] == [(0, 2.5)]
        ev.log(1, {"loss": 1.5}, prefix="")
    with EventLog(uri, suffix=".b") as ev:  # a restored worker opens a new file beside the first
        ev.log(2, {"loss": 1.0})
    scalars = read_scalars(uri)
    assert len(event_files(uri)) == 2
    assert sorted(scalars["loss"]) == [(0, 2.5), (1, 1.5), (2, 1.0)]
    assert scalars["val_accuracy"] == [(0, 0.5)] and scalars["epoch"] == [(0, 0.0)]
    assert "resumed" not in scalars and "name" not in scalars and "bad" not in scalars  # bools, text, NaN
    clear_events(uri)
    assert event_files(uri) == [] and read_scalars(uri) == {}


def test_copy_events_brings_a_cached_pretrainings_curves_into_the_run(tmp_path, s3_bucket):
    entry = f"{s3_bucket}/cache/abc/pretrain"
    with EventLog(entry) as ev:
        ev.log(0, {"loss": 3.0})
        ev.log(1, {"loss": 2.0})
    run = str(tmp_path / "run" / "pretrain")
    copy_events(entry, run)
    assert read_scalars(run) == read_scalars(entry) == {"loss": [(0, 3.0), (1, 2.0)]}
