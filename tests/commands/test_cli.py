"""The command line: a problem with what the user gave (storage included) is one line on stderr, exit 2."""

from __future__ import annotations

import pytest

from raysemi.commands.cli import main
from raysemi.distributed import ray_session, ray_utils


@pytest.fixture
def no_aws_credentials(s3_server, monkeypatch):
    """The loopback S3 endpoint, but no credentials anywhere (env, files, instance metadata)."""
    import s3fs

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs keeps clients made with the old credentials
    yield
    s3fs.S3FileSystem.clear_instance_cache()  # and the ones made without them (the env is restored next)


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_session, "init_ray", refuse)
    monkeypatch.setattr(ray_utils, "fit", refuse)


@pytest.mark.parametrize("command", [
    ["run"], ["pretrain"], ["finetune"], ["pseudolabel", "--model", "s3://raysemi-demo/model.safetensors"],
    ["evaluate", "--model", "s3://raysemi-demo/model.safetensors"],
])
def test_s3_without_credentials_is_one_line_and_exit_2(command, demo_dataset_s3, no_aws_credentials, no_ray,
                                                       tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*command, "--set", f"data.path={demo_dataset_s3}", "--set", f"run.output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith(f"raysemi {command[0]}: error:")
    assert "no usable AWS credentials" in err
    assert not out.exists()


def test_s3_output_without_credentials_is_one_line(demo_dataset, no_aws_credentials, no_ray, capsys):
    code = main(["run", "--set", f"data.path={demo_dataset}", "--set", "run.output_dir=s3://raysemi-demo/runs/x",
                 "--set", "pretrain.batch_size=16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "cannot check s3://raysemi-demo/runs/x: no usable AWS credentials" in err


def test_dataset_without_labels_says_so(tmp_path, no_ray, capsys):
    from raysemi.data.shards import Manifest, ShardInfo, SplitInfo, write_manifest

    root = str(tmp_path / "ds")
    unlabeled = SplitInfo(rows=4, shards=[ShardInfo("unlabeled/part-00000.parquet", 4, 0, "0" * 64)])
    write_manifest(root, Manifest(classes=[], splits={"unlabeled": unlabeled}))
    code = main(["run", "--set", f"data.path={root}", "--set", f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "has no labelled rows" in err and "class subfolders" in err and "'label' column" in err
    assert "val/test fractions" not in err


def test_s3_compatible_endpoint_without_credentials_prints_only_the_error_line(s3_server, tmp_path):
    """With AWS_ENDPOINT_URL set (MinIO and the like), botocore logs "Found endpoint for s3 via:
    environment_global." at INFO on every client: in a real process (basicConfig, no pytest log capture) the
    user must see only raysemi's own line."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ENDPOINT_URL=s3_server, AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path),
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials", AWS_CONFIG_FILE="/nonexistent/config")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from raysemi.commands.cli import main; sys.exit(main())", "run",
         "--set", "data.path=s3://raysemi-demo/dataset", "--set", f"run.output_dir={tmp_path / 'run'}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("raysemi run: error:") and "no usable AWS credentials" in lines[0]
