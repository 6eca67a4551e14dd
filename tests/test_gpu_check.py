"""bench/gpu_check.py in its dry mode (CPU, tiny sizes): every section's code path runs here, so that the
GPU check cannot rot on machines without a GPU, and a broken section fails the run instead of vanishing."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

gpu_check = importlib.import_module("bench.gpu_check")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry mode's tests; `make gpu-check` on a GPU")


def _run(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--dry", "--out", str(out), *args])
    return rc, json.loads(out.read_text())


def test_byol_step_section_measures_and_says_it_is_dry(tmp_path):
    rc, result = _run(tmp_path, "--only", "byol_step")
    assert rc == 0 and result["ok"] and result["mode"] == "dry (no CUDA)"
    (row,) = result["sections"]["byol_step"]["rows"]
    assert row["backbone"] == "resnet18" and row["size"] == 32 and row["images_per_s"] > 0
    assert row["peak_memory_gib"] is None  # no CUDA memory figures in a dry run
    assert {"torch", "torch_cuda", "ray", "gpu"} <= set(result["machine"])


@pytest.mark.dali
def test_dali_decode_section_runs_the_cpu_pipeline(tmp_path):
    pytest.importorskip("nvidia.dali")
    rc, result = _run(tmp_path, "--only", "dali_decode")
    section = result["sections"]["dali_decode"]
    assert rc == 0 and section["status"] == "ok" and section["decoder"] == "cpu"
    assert section["images"] == 64 and section["images_per_s"] > 0


def test_a_broken_section_fails_the_run_with_its_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN went away")

    monkeypatch.setattr(gpu_check, "byol_steps", broken)
    rc, result = _run(tmp_path, "--only", "byol_step")
    assert rc == 1 and not result["ok"] and result["failed"] == ["byol_step"]
    assert result["sections"]["byol_step"]["error"] == "RuntimeError: cuDNN went away"


@pytest.mark.ray
@pytest.mark.slow
def test_whole_dry_mode_on_the_session_ray(ray_session, tmp_path):
    """All five sections, attached to the tests' Ray (the check leaves it running)."""
    rc, result = _run(tmp_path)
    assert rc == 0, result["failed"]
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in result["sections"].values())
    assert result["sections"]["gpu_tests"]["tests"] >= 1  # collected (and skipped: no CUDA)
    ddp = result["sections"]["ddp"]
    assert ddp["backend"] == "gloo" and ddp["weights_spread"] == 0.0
    assert result["sections"]["end_to_end"]["rounds"] == 2
    assert ray_session.is_initialized()
