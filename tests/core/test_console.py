"""What a run prints: the stage line, plain progress lines off a terminal, and a quiet CLI run beside another Ray."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysemi.core import console

REPO = Path(__file__).resolve().parents[2]


def test_duration():
    assert [console.duration(s) for s in (0, 42.4, 60, 185, 3600, 3725)] == ["0s", "42s", "1m00s", "3m05s",
                                                                            "1h00m", "1h02m"]


def test_stage_line_shows_the_metrics_it_has_and_extrapolates_the_eta_from_this_process():
    metrics = {"loss": 0.41234, "knn_accuracy": 0.5123, "images_per_s_total": 812.4, "data_wait_fraction": 0.043,
               "lr": 0.1, "val_accuracy": float("nan")}
    line = console.stage_line("pretrain", "epoch", 3, 25, metrics, elapsed_s=62)
    assert line == "pretrain  epoch  3/25  loss 0.4123  knn 0.512  812 img/s  wait 4%  elapsed 1m02s  ETA 7m35s"
    # Restored at epoch 20: 2 epochs ran in 20 s, 3 remain -> 30 s; the last epoch has no ETA.
    assert console.stage_line("pretrain", "epoch", 22, 25, {}, 20, done_at_start=20).endswith("ETA 30s")
    assert "ETA" not in console.stage_line("round 1", "step", 600, 600, {"val_accuracy": 0.8}, 90)
    assert console.stage_line("round 1", "step", 600, 600, {"val_accuracy": 0.8}, 90).startswith(
        "round 1   step 600/600  val acc 0.800")


def test_plain_progress_logs_a_line_per_tenth_and_one_at_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="raysemi"):
        bar = console.PlainProgress(1000, "pseudolabel", unit="img", every_s=1e9, min_interval_s=0)
        for _ in range(100):
            bar.update(10)
        bar.set_postfix_str("shards 8/8")
        bar.close()
        bar.close()  # idempotent, as tqdm's
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # 100, 200, ..., 900 and the closing 1000/1000
    assert lines[0].startswith("pseudolabel: 100/1000 img (10%)")
    assert lines[-1].startswith("pseudolabel: 1000/1000 img (100%)") and lines[-1].endswith("shards 8/8")


def test_plain_progress_of_a_short_loop_is_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="raysemi"), console.PlainProgress(100, "pseudolabel") as bar:
        for _ in range(100):
            bar.update(1)
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == ["pseudolabel: 100/100 it (100%)"]


def test_progress_off_a_terminal_is_plain_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115 - a stream that is not a tty
    assert isinstance(console.progress(10, "ingest"), console.PlainProgress)
    assert not isinstance(console.progress(10, "ingest", enabled=False), console.PlainProgress)


@pytest.mark.ray
@pytest.mark.slow
def test_cli_run_prints_one_line_per_epoch_and_no_traceback_beside_another_ray(ray_session, demo_dataset, tmp_path):
    """``raysemi pretrain`` starts its private Ray while this test session's Ray runs: Ray Train's
    placement-group cleaner used to print a "Found multiple active Ray instances" traceback, and every report
    was printed once per rank."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "raysemi", "pretrain", "--set", f"data.path={demo_dataset}",
           "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "model.backbone=test_resnet",
           "--set", "data.image_size=32", "--set", "pretrain.epochs=2", "--set", "pretrain.warmup_epochs=0",
           "--set", "pretrain.batch_size=64", "--set", "ray.num_workers=2", "--set", "ray.cpus_per_worker=0.5"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert "Traceback" not in out
    assert "Reporting training result" not in out
    assert "Token authentication is enabled" not in out
    assert "PreemptionWatcher" not in out
    epochs = [ln for ln in lines if "pretrain  epoch" in ln]
    assert len(epochs) == 2 and "epoch 1/2" in epochs[0] and "ETA" in epochs[0] and "loss" in epochs[1]
    assert len(lines) <= 8, out


def test_python_dash_m_and_version():
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "raysemi", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"raysemi {version('raysemi')}"
