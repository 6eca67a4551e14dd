"""Secure defaults: checkpoints are never unpickled, the local Ray is private, no credentials in configs.

* A checkpoint whose pickle carries code (a ``__reduce__`` payload, the classic pickle exploit) is refused by
  ``load_state`` / ``safe_torch_load`` / ``load_weights`` with ``CheckpointError``, and the payload never runs
  (a control shows that the same file *does* run it under a plain ``torch.load``).
* ``init_ray`` attaches to a cluster when one is there and otherwise starts a local Ray whose dashboard and job
  API bind to 127.0.0.1, with token authentication on (checked on the code path, and for real in a subprocess
  so that the test session's own Ray is left alone).
* No file under configs/ or clusters/ (nor the Dockerfile or the KubeRay runtime env) holds credentials.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from raysemi.core import io as rio
from raysemi.core.io import (
    CheckpointError,
    load_state,
    load_weights,
    safe_torch_load,
    save_state,
    save_weights,
)
from raysemi.distributed import ray_session
from tests.procs import NO_OTHER_RAY

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this object runs a shell command that creates ``marker`` (what an attacker would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# ---------------------------------------------------------------- checkpoints


def test_pickled_payload_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # What a tampered checkpoint in shared storage looks like: plain torch.save of an object with a payload.
    torch.save({"model": {"w": torch.ones(2)}, "extra": Payload(marker)}, ckpt / rio.STATE_FILE)

    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        load_state(ckpt)
    with pytest.raises(CheckpointError):
        safe_torch_load((ckpt / rio.STATE_FILE).read_bytes(), "state.pt")
    assert not marker.exists(), "the pickled payload ran"

    # Control: the file really is an exploit, which an ordinary unpickling load executes.
    torch.load(ckpt / rio.STATE_FILE, weights_only=False)
    assert marker.exists()


def test_a_plain_tensor_checkpoint_still_loads(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "history": [0.5, 0.25], "name": "byol"}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["epoch"] == 3 and back["name"] == "byol" and back["history"] == [0.5, 0.25]
    assert torch.equal(back["model"]["w"], torch.arange(4.0))


def test_a_pickle_posing_as_safetensors_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "classifier.safetensors"
    fake.write_bytes(pickle.dumps({"weights": Payload(marker)}))
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_weights(str(fake))
    assert not marker.exists()
    # ... and a torch.save zip renamed to .safetensors is refused the same way.
    torch.save({"w": torch.ones(1), "x": Payload(marker)}, tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError):
        load_weights(str(tmp_path / "renamed.safetensors"))
    assert not marker.exists()


def test_safetensors_weights_round_trip(tmp_path):
    uri = str(tmp_path / "w.safetensors")
    digest = save_weights(uri, {"a": torch.ones(3), "b": torch.zeros(2, 2)}, {"classes": "x,y"})
    tensors, meta = load_weights(uri)
    assert len(digest) == 64 and meta == {"classes": "x,y"}
    assert torch.equal(tensors["a"], torch.ones(3)) and tensors["b"].shape == (2, 2)


# ---------------------------------------------------------------- the local Ray


class _FakeRay:
    """Records ray.init calls; ``auto_finds`` says whether address="auto" finds a running cluster."""

    def __init__(self, auto_finds: bool) -> None:
        self.auto_finds = auto_finds
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs.get("address") == "auto" and not self.auto_finds:
            raise ConnectionError("Could not find any running Ray instance.")


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    def make(auto_finds: bool) -> _FakeRay:
        fake = _FakeRay(auto_finds)
        monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
        monkeypatch.setattr(ray, "init", fake.init)
        return fake

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return make


def test_init_ray_without_a_cluster_starts_a_loopback_ray(fake_ray):
    fake = fake_ray(auto_finds=False)
    ray_session.init_ray()
    # One plain ray.init(): Ray attaches to a cluster that `ray start` left on this machine, else starts a
    # private one; never address="auto", which would join any other process's local Ray.
    assert [c.get("address") for c in fake.calls] == [None]
    local = fake.calls[-1]
    assert local["dashboard_host"] == "127.0.0.1"
    assert not any("auth" in k.lower() for k in local), "init_ray must leave Ray's token authentication alone"
    assert os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled"


def test_init_ray_uses_the_address_a_ray_job_gives(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    fake = fake_ray(auto_finds=False)
    ray_session.init_ray()
    assert [c.get("address") for c in fake.calls] == ["10.0.0.5:6379"]


_PROBE = NO_OTHER_RAY + textwrap.dedent(
    """
    import json, socket, urllib.error, urllib.request
    import ray
    from raysemi.distributed.ray_session import init_ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    init_ray()
    import os, time
    from tests.procs import descendants, listening_sockets
    time.sleep(3)  # the agents open their ports a moment after ray.init returns
    node = ray._private.worker._global_node
    host, port = node.address_info["webui_url"].rsplit(":", 1)
    out = {"webui_host": host, "node_ip": node.node_ip_address,
           "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN}
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=10)
        out["unauthenticated"] = 200
    except urllib.error.HTTPError as err:
        out["unauthenticated"] = err.code
    with socket.socket() as s:
        s.settimeout(3)
        out["reachable_on_node_ip"] = s.connect_ex((node.node_ip_address, int(port))) == 0
    out["listening"] = sorted(listening_sockets([os.getpid(), *descendants(os.getpid())]))

    # Then a 2-worker DDP training on this private Ray, its sockets sampled while the Train workers run.
    import threading
    from raysemi.core.config import load_config
    from raysemi.data.synthetic import make_demo_dataset
    from raysemi.stages import pretrain
    from tests.procs import pids_titled

    make_demo_dataset("data", per_class=20, unlabeled=20, size=32, seed=0)
    cfg = load_config(None, [
        "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "model.pred_hidden_dim=64", "pretrain.warmup_epochs=0", "pretrain.knn_every=0", "pretrain.epochs=3",
        "pretrain.batch_size=16", "data.image_size=32", f"data.path={os.path.abspath('data/dataset')}",
        f"run.output_dir={os.path.abspath('run')}",
        "ray.num_workers=2", "ray.cpus_per_worker=0.5"])
    training, samples, stop = set(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            if pids_titled("RayTrainWorker"):  # a Train worker is up: its process group is there
                samples[0] += 1
                training.update(listening_sockets([os.getpid(), *descendants(os.getpid())]))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pretrain.run(cfg)
    stop.set()
    watcher.join()
    out["training_samples"] = samples[0]
    out["training_listening"] = sorted(training)
    ray.shutdown()
    print("PROBE " + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.ray
def test_local_ray_started_by_init_ray_is_private(tmp_path):
    """A real local Ray from init_ray(), in a subprocess (the test session keeps its own Ray)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rssec-", dir="/tmp"))  # short: Ray's unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(ray_tmp), HOME=str(tmp_path), PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("PROBE "):])
    assert out["webui_host"] == "127.0.0.1"
    # Every port of the private Ray (GCS, raylet, workers, dashboard and runtime-env agents, metrics) is on
    # loopback: nothing is reachable from another machine.
    assert out["node_ip"] == "127.0.0.1"
    listening = out["listening"]
    assert len(listening) >= 5, listening  # GCS, raylet, dashboard, its agent, the runtime-env agent
    assert [s for s in listening if not s[0].startswith("127.")] == [], listening
    # ... and so is every port opened while a 2-worker DDP run trains: torch's TCPStore rendezvous would listen
    # on every interface (``::``), unauthenticated; on a private Ray the group meets through a file instead.
    assert out["training_samples"] >= 3, out
    assert any("RayTrainWorker" in s[2] for s in out["training_listening"]), out["training_listening"]
    assert [s for s in out["training_listening"] if not s[0].startswith("127.")] == [], out["training_listening"]
    assert out["token_auth"] is True
    assert out["unauthenticated"] == 401
    # Ray generated the local cluster's token in this (temporary) HOME, nowhere else.
    assert (tmp_path / ".ray" / "auth_token").is_file()


# ---------------------------------------------------------------- no credentials in configs


SCANNED = sorted(
    [*REPO.glob("configs/**/*.yaml"), *REPO.glob("clusters/**/*.yaml"), REPO / "Dockerfile",
     REPO / ".dockerignore", REPO / ".rayignore"]
)

_SECRET_KEY = re.compile(
    r"(secret|password|passwd|credential|access[_-]?key|session[_-]?token|auth[_-]?token|api[_-]?key|private[_-]?key)",
    re.IGNORECASE,
)
_SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key|aws_access_key_id|aws_session_token", re.IGNORECASE),
    re.compile(r"\bRAY_AUTH_TOKEN\s*[=:]\s*\S", re.IGNORECASE),  # a Ray token written out
    re.compile(r"\bghp_[A-Za-z0-9]{36}\b|\bxox[bp]-[A-Za-z0-9-]{10,}"),  # GitHub / Slack tokens
    # 40 base64 characters with digits and both cases: the shape of an AWS secret access key
    re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[0-9])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])"
               r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
]


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, str(k)), v
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))


def _env_assignments(node):
    """Names set as environment variables anywhere in a manifest or config: k8s ``env`` lists, runtime env
    ``env_vars`` (also inside KubeRay's runtimeEnvYAML string) and ``docker --env`` options."""
    names = []
    for path, value in _walk(node):
        if path and path[-1] == "env" and isinstance(value, list):
            names += [e.get("name", "") for e in value if isinstance(e, dict)]
        if path and path[-1] == "env_vars" and isinstance(value, dict):
            names += list(value)
        if path and path[-1] == "runtimeEnvYAML" and isinstance(value, str):
            names += _env_assignments(yaml.safe_load(value) or {})
        if isinstance(value, str):
            names += re.findall(r"--env[= ]([A-Za-z_][A-Za-z0-9_]*)", value)
    return names


def credential_findings(text: str, name: str = "text") -> list[str]:
    found = [f"{name}: {p.pattern!r}" for p in _SECRET_TEXT if p.search(text)]
    docs = []
    if name.endswith((".yaml", ".yml")):
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for doc in docs:
        for path, value in _walk(doc):
            key = path[-1]
            # file_mounts keys are remote paths (the Ray token file travels by reference); checked below.
            if path[0] != "file_mounts" and _SECRET_KEY.search(key) and value not in (None, "", {}, []):
                found.append(f"{name}: key {'.'.join(path)}")
        for env_name in _env_assignments(doc):
            if _SECRET_KEY.search(env_name) or env_name.upper().startswith(("AWS_ACCESS", "AWS_SECRET")):
                found.append(f"{name}: environment variable {env_name}")
        for path, value in _walk(doc):  # file_mounts must not ship cloud credentials to the nodes
            if path and path[0] == "file_mounts" and isinstance(value, str) and re.search(r"\.aws|\.config/gcloud|\.kube", value):
                found.append(f"{name}: file mount {value}")
    return found


def test_the_credential_scan_catches_planted_credentials():
    planted = {
        "a.yaml": "provider:\n  aws_secret_access_key: abc\n",
        "b.yaml": "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: x\n",
        "c.yaml": "runtimeEnvYAML: |\n  env_vars:\n    AWS_ACCESS_KEY_ID: x\n",
        "d.yaml": "docker:\n  run_options: [--env RAY_AUTH_TOKEN=abcdef]\n",
        "e.yaml": "file_mounts:\n  /home/ray/.aws: ~/.aws\n",
        "f.yaml": "key_id: AKIAABCDEFGHIJKLMNOP\n",
        "g.yaml": "data:\n  note: wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEYab\n",
        "h.yaml": "ray:\n  password: hunter2\n",
        "Dockerfile": "ENV AWS_SECRET_ACCESS_KEY=abc\n",
    }
    for name, text in planted.items():
        assert credential_findings(text, name), f"the scan missed the credential in {name}"


@pytest.mark.parametrize("path", SCANNED, ids=[str(p.relative_to(REPO)) for p in SCANNED])
def test_no_credentials_in_configs_clusters_or_image(path):
    assert path.is_file()
    assert credential_findings(path.read_text(), path.name) == []


def test_configs_and_clusters_are_all_scanned():
    names = {str(p.relative_to(REPO)) for p in SCANNED}
    for expected in ("clusters/aws.yaml", "clusters/gcp.yaml", "clusters/k8s/raycluster.yaml",
                     "clusters/k8s/rayjob.yaml", "configs/covid19.yaml", "configs/oct2017.yaml",
                     "configs/kvasir.yaml", "Dockerfile"):
        assert expected in names
