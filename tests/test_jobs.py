"""`ray job submit` against a real Ray head: the way users run raysemi on a cluster (docs/cluster.md).

The module starts its own head with `ray start --head --block` in a private temporary folder, on free ports,
with the dashboard (the job API) on 127.0.0.1 and token authentication on (RAY_AUTH_MODE=token and a token file
of its own, RAY_AUTH_TOKEN_PATH, so that ~/.ray/auth_token is neither read nor written). It is stopped by
signalling that `ray start` process, never with `ray stop`: `ray stop` takes no address and kills every Ray
process of the user on the machine, including the test session's own local Ray (tests/conftest.py) and any
other Ray running here. With --block, `ray start` stays in the foreground and, on SIGTERM, stops the processes
it started (its reaper kills its process group should it die); whatever survives is killed by pid, selected by
the head's unique temporary folder in its command line.

The head is started with `.venv/bin` first on PATH: a job's entrypoint runs in the head's environment, as on a
cluster node where the image has `raysemi` installed, so the submitted command is the one users type
(`raysemi run --config ...`), not `python -m raysemi`.

Ray 2.60 resolves `--node-ip-address 127.0.0.1` to the machine's routable address (services.
resolve_ip_for_localhost), and its GCS and raylet listen on all interfaces: what binds to loopback is the
dashboard and job API, checked below; the token guards the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# Keeps the submitted run tiny (2 CPU cores, no GPU): one epoch of each stage, one pseudo-label round.
TINY = [
    "data.image_size=32",
    "pretrain.epochs=1",
    "pretrain.warmup_epochs=0",
    "pretrain.knn_every=0",
    "pretrain.batch_size=32",
    "pretrain.checkpoint_every=1",
    "finetune.steps=4",
    "finetune.eval_every=4",
    "finetune.warmup_steps=0",
    "finetune.batch_size=16",
    "finetune.checkpoint_every=1",
    "pseudolabel.rounds=1",
    "pseudolabel.budget=20",
    "pseudolabel.num_actors=1",
    "ray.num_workers=1",
    "run.name=jobtest",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _routable_ip() -> str | None:
    """This machine's non-loopback address (the one Ray uses as node IP), or None without a network."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # UDP: no packet is sent; picks the outgoing interface's address
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def _procs_mentioning(text: str) -> list[int]:
    """Pids of this machine's processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


class Head:
    """A Ray head of this test module's own; ``submit``/``status``/``logs`` talk to its job API."""

    def __init__(self) -> None:
        # Short path: Ray's unix sockets live under the temp dir and AF_UNIX paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="rsjob-", dir="/tmp"))
        self.temp_dir = self.root / "ray"
        self.token_file = self.root / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # No Ray setting of this process leaks into the head, but the Train speed knobs of tests/conftest.py.
        keep = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in keep}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.log_path = self.root / "head.log"
        cmd = [
            str(RAY), "start", "--head", "--block",
            "--temp-dir", str(self.temp_dir),
            "--node-ip-address", "127.0.0.1",
            "--port", str(_free_port()),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--num-cpus", "2",
            "--disable-usage-stats",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    # ------------------------------------------------------------------ lifecycle

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                status, _ = self.http("/api/jobs/")
                if status == 200:
                    return
            time.sleep(1)
        raise RuntimeError(f"the Ray head did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:  # its graceful stop takes ~30 s here; the head's state is thrown away, so 5 s, then kills
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Anything of this head still alive (a worker in a process group of its own): by pid, ours only.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _procs_mentioning(str(self.temp_dir))
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            time.sleep(3)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ job API

    def http(self, path: str, token: str | None = "default") -> tuple[int, bytes]:
        req = urllib.request.Request(self.address + path)
        if token == "default":
            token = self.token_file.read_text().strip()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def submit(self, *entrypoint: str, submission_id: str) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo>`` exactly as docs/cluster.md shows, without waiting."""
        cmd = [
            str(RAY), "job", "submit", "--address", self.address, "--working-dir", str(REPO),
            "--submission-id", submission_id, "--no-wait", "--", *entrypoint,
        ]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300)

    def status(self, job_id: str) -> dict:
        code, body = self.http(f"/api/jobs/{job_id}")
        assert code == 200, body
        return json.loads(body)

    def wait(self, job_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.status(job_id)
            if info["status"] in TERMINAL:
                return info
            time.sleep(3)
        subprocess.run([str(RAY), "job", "stop", "--address", self.address, job_id], env=self.env,
                       capture_output=True, timeout=60)
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s; logs:\n{self.logs(job_id)[-4000:]}")

    def logs(self, job_id: str) -> str:
        code, body = self.http(f"/api/jobs/{job_id}/logs")
        assert code == 200, body
        return json.loads(body)["logs"]


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory) -> Path:
    """A small synthetic data set (the embedded demo's generator) in the ingested format."""
    from raysemi.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("jobdata")
    make_demo_dataset(str(root), size=32, per_class=40, unlabeled=60)
    return root / "dataset"


def test_head_job_api_is_on_loopback_and_requires_the_token(head):
    assert head.http("/api/jobs/", token=None)[0] == 401
    assert head.http("/api/jobs/", token="not-the-token")[0] in (401, 403)
    assert head.http("/api/jobs/")[0] == 200
    # The dashboard is bound to 127.0.0.1, not to the node's routable address.
    routable = _routable_ip()
    if routable is not None:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(3)
            s.connect((routable, head.dashboard_port))


def test_ray_job_submit_raysemi_run_on_demo_data(head, demo_dataset, tmp_path):
    out = tmp_path / "run"
    job_id = f"raysemi-test-run-{uuid.uuid4().hex[:8]}"
    overrides = [f"data.path={demo_dataset}", f"run.output_dir={out}", *TINY]
    sets = [x for o in overrides for x in ("--set", o)]
    sub = head.submit("raysemi", "run", "--config", "configs/demo.yaml", *sets, submission_id=job_id)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    info = head.wait(job_id, timeout=780)
    logs = head.logs(job_id)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    # The command attached to the running cluster (RAY_ADDRESS from the job) instead of starting its own Ray.
    assert "Started a local Ray instance" not in logs
    assert "report:" in logs

    report = json.loads((out / "report.json").read_text())
    assert report["run"]["name"] == "jobtest"
    assert report["run"]["mode"] == "full"
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["n_pseudo"] == 20
    assert report["test"]["n"] == report["data"]["n_test"]
    confusion = np.array(report["test"]["confusion"])  # the accuracy is the one of the test predictions
    assert confusion.sum() == report["test"]["n"]
    assert report["test"]["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert (out / "report.md").read_text().startswith("# raysemi report")
    assert (out / "config.yaml").is_file()


def test_ray_job_with_invalid_config_fails_with_the_clear_error(head):
    job_id = f"raysemi-test-bad-{uuid.uuid4().hex[:8]}"
    sub = head.submit("raysemi", "run", "--config", "configs/demo.yaml", "--set", "pretrain.epochs=zero",
                      submission_id=job_id)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    info = head.wait(job_id, timeout=300)
    logs = head.logs(job_id)
    assert info["status"] == "FAILED", logs
    assert "exit code 2" in (info.get("message") or ""), info
    errors = [line for line in logs.splitlines() if "raysemi run: error:" in line]
    assert errors == ["raysemi run: error: pretrain.epochs: expected an integer, got 'zero'"], logs
    assert "Traceback" not in logs
