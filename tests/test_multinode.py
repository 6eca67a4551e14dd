"""A real multi-node Ray cluster: a head and two worker nodes on this machine, all data and outputs on S3.

The cluster and the raysemi driver on it live in a subprocess (``tests/multinode_cluster.py``), so that this
pytest process keeps at most its one session Ray. One cluster serves the module; the tests run in file order
(the elastic test runs first among those that lose a node, on nodes that joined with the cluster; the node-loss
tests add back the nodes an earlier test removed; the last test checks the driver's working folder).

- The pseudo-label pool with 3 actors, one on every node, each input id predicted exactly once.
- The same with worker node ``b`` removed (its processes killed, as a spot node disappears) while its actor
  holds a shard, once other shards are committed: the run finishes, the lost shard is redone elsewhere,
  0 ids missing or duplicated (predict_shards checks it; the test counts again from the files).
- A Tune sweep of two trials whose Train workers run on the two worker nodes at once (the head's CPUs held); once
  one trial has completed and the other has registered a checkpoint, the other's node is removed: the sweep
  finishes, the completed trial is not started again (trial starts recorded on S3), the lost one recovers.
- Elastic BYOL pretraining (``ray.min_workers=1``) with ``SPREAD``: its two Train workers on the two worker nodes
  (read back from the state API), weights and checkpoints on S3; one node is removed and not replaced: the run
  goes on with one worker from the last registered checkpoint.
- ``ray job submit --working-dir . -- raysemi run ...`` to the head's job API (token required): SUCCEEDED, the
  job attached to the cluster, its report and checkpoints on S3.
- The driver's working folder (the subprocess's cwd, also the nodes' and their workers') stays empty.

The cluster runs with token authentication and a token of its own (``RAY_AUTH_TOKEN_PATH`` in its temp folder).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysemi.core import io as rio
from raysemi.core.config import load_config
from raysemi.data.shards import read_shard
from tests.multinode_cluster import NODE_LOSS_PRETRAIN, TUNE_SPACE, TUNE_TINY
from tests.stages.test_pseudolabel import TINY as PSEUDOLABEL_TINY
from tests.stages.test_pseudolabel import make_dataset, save_model

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("multinode_cluster.py")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class ClusterProcess:
    """The subprocess holding the cluster and its driver; ``call`` sends one command and waits for its reply."""

    def __init__(self, cwd: Path, ray_tmp: str) -> None:
        self.cwd, self.ray_tmp = cwd, ray_tmp
        self.log_path = os.path.join(ray_tmp, "driver.log")
        # Token authentication on, with a token of this cluster's own (never ~/.ray/auth_token), as on a real
        # cluster; .venv/bin on PATH, so that a job's entrypoint is the command users type (`raysemi run`).
        self.token_path = os.path.join(ray_tmp, "auth_token")
        Path(self.token_path).write_text(secrets.token_hex(32))
        os.chmod(self.token_path, 0o600)
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(RAY_TMPDIR=ray_tmp, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **self.auth_env)
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT)], cwd=cwd, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self._replies.put(json.loads(line[3:]))
        self._replies.put(None)  # the process ended

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "".join(Path(self.log_path).read_text(errors="replace").splitlines(True)[-n:])

    def call(self, do: str, timeout: float = 240.0, **args) -> dict:
        self.proc.stdin.write(json.dumps({"do": do, "args": args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no reply to {do!r} within {timeout:.0f} s; driver log:\n{self.log_tail()}")
        if reply is None:
            pytest.fail(f"the cluster process ended (rc={self.proc.wait()}); driver log:\n{self.log_tail()}")
        assert "error" not in reply, f"{do}: {reply['error']}\ndriver log:\n{self.log_tail()}"
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # its nodes' reapers end the Ray processes with it
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The driver's working folder: empty, and it must stay so."""
    return tmp_path_factory.mktemp("driver-cwd")


@pytest.fixture(scope="module")
def cluster(s3_server, workdir):
    # Ray's unix sockets live under the temp folder: keep its path short.
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    proc = ClusterProcess(workdir, ray_tmp)
    try:
        proc.nodes = proc.call("nodes", timeout=180)
        yield proc
    finally:
        proc.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_cluster_has_three_nodes_with_their_own_temp_folders(cluster):
    nodes = cluster.nodes
    assert set(nodes["nodes"]) == {"head", "a", "b"} and len(set(nodes["nodes"].values())) == 3
    dirs = nodes["temp_dirs"]
    assert len({os.path.dirname(d) for d in dirs.values()}) == 3, dirs




def _job_api(cluster, path: str, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(cluster.nodes["dashboard"] + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {}


def test_ray_job_submit_raysemi_run_on_the_cluster_everything_on_s3(cluster, s3_bucket, demo_dataset_s3):
    """``ray job submit --working-dir . -- raysemi run ...`` to the head's job API (token required), as
    docs/cluster.md shows: the job attaches to the cluster, SUCCEEDED, data, checkpoints and report on S3."""
    token = Path(cluster.token_path).read_text().strip()
    assert _job_api(cluster, "/api/jobs/", None)[0] == 401  # the job API wants the cluster's token
    job_id = f"raysemi-multinode-{uuid.uuid4().hex[:8]}"
    out = f"{s3_bucket}/job-run"
    sets = [f"data.path={demo_dataset_s3}", f"run.output_dir={out}", f"ray.storage_path={s3_bucket}/ray",
            "run.name=jobtest", *TUNE_TINY, "finetune.steps=4", "ray.cpus_per_worker=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(cluster.auth_env)
    sub = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.nodes["dashboard"], "--working-dir", str(REPO),
         "--submission-id", job_id, "--no-wait", "--", "raysemi", "run", "--config", "configs/demo.yaml",
         *(x for o in sets for x in ("--set", o))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    t0 = time.monotonic()
    deadline, info = t0 + 300, {}
    while time.monotonic() < deadline:
        code, info = _job_api(cluster, f"/api/jobs/{job_id}", token)
        assert code == 200, code
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _job_api(cluster, f"/api/jobs/{job_id}/logs", token)[1].get("logs", "")
    assert info.get("status") == "SUCCEEDED", f"{info}\n{logs[-5000:]}"
    assert "Started a local Ray instance" not in logs  # it attached to the cluster
    report = json.loads(rio.read_bytes(f"{out}/report.json"))
    assert report["run"]["name"] == "jobtest" and report["run"]["dataset"] == demo_dataset_s3
    assert report["test"]["n"] == report["data"]["n_test"] > 0
    assert rio.exists(f"{out}/round=0/classifier.safetensors")
    fs, path = rio.filesystem(f"{s3_bucket}/ray/jobtest-round0")
    assert fs.exists(path)  # Ray Train's run folder (checkpoints) on S3
    print(f"job {info['status']} {time.monotonic() - t0:.1f} s after its submission")


def test_elastic_pretraining_goes_on_with_fewer_workers_when_a_node_is_lost(cluster, s3_bucket, demo_dataset_s3):
    """Elastic BYOL pretraining (``ray.min_workers=1``, ``ray.num_workers=2``, ``SPREAD``) with a Train worker on each
    worker node (read back from the state API), data, weights and checkpoints on S3, loses one node once a checkpoint is registered, and no replacement comes: the run goes on with one worker from
    that checkpoint and finishes. Every epoch is in the final history once, in order; the restart reran at most one
    completed epoch. (Growing back on a replacement node: ``bench/node_loss.py --kinds pretrain-elastic``.)"""
    epochs = 4
    reply = cluster.call("train_node_loss", timeout=600, stage="pretrain", replace=None, tag="e", overrides=[
        *NODE_LOSS_PRETRAIN, f"data.path={demo_dataset_s3}", f"run.output_dir={s3_bucket}/elastic",
        f"ray.storage_path={s3_bucket}/ray", "run.name=elastic", f"pretrain.epochs={epochs}", "ray.min_workers=1",
    ])
    assert reply["workers_before"] == ["a", "b"] and reply["victim"] in ("a", "b"), reply  # SPREAD: two nodes
    assert reply["removed_after_s"] is not None, f"the run ended before a node could be removed: {reply}"
    assert rio.exists(f"{s3_bucket}/elastic/pretrain/byol.safetensors")  # the weights, and Ray Train's run, on S3
    fs, path = rio.filesystem(f"{s3_bucket}/ray/elastic-pretrain")
    assert fs.exists(path)
    assert reply["done"] == list(range(epochs)), reply
    first, then = reply["groups"]  # the epochs each worker group logged
    restart, workers = then[0], reply["workers"]  # the group that finished the run: one worker, from the checkpoint
    # From the checkpoint registered at the loss, or a later one the lost group had reported before it died.
    assert reply["registered"] + 1 <= restart <= first[-1] + 1, reply
    assert workers[:restart] == [2] * restart and workers[restart:] == [1] * (epochs - restart), reply
    assert first[-1] - restart <= 0, reply  # at most the interrupted epoch ran twice
    print(f"node {reply['victim']} removed {reply['removed_after_s']:.1f} s in (epoch {reply['registered']} "
          f"registered); workers per epoch {workers}; epochs per group {reply['groups']}; {reply['seconds']:.1f} s")


def pseudolabel_setup(bucket: str, shards: int, rows: int):
    cfg = load_config(None, PSEUDOLABEL_TINY)
    uris = make_dataset(f"{bucket}/dataset", shards=shards, rows=rows)
    model = f"{bucket}/models/classifier.safetensors"
    save_model(model, cfg, seed=0)
    overrides = [*PSEUDOLABEL_TINY, "pseudolabel.num_actors=3", "ray.placement_strategy=SPREAD",
                 f"run.output_dir={bucket}/run"]
    return uris, model, overrides


def assert_each_id_once(uris: list[str], out: str) -> int:
    """Count again from the files: every input id in exactly one prediction row, no other rows."""
    expected = collections.Counter(i for u in uris for i in read_shard(u, ["id"]).column("id").to_pylist())
    fs, path = rio.filesystem(out)
    fs.invalidate_cache()
    got: collections.Counter = collections.Counter()
    for part in fs.glob(f"{path}/part-*.parquet"):
        got.update(pq.read_table(part, filesystem=fs, columns=["id"]).column("id").to_pylist())
    missing, extra = expected - got, got - expected
    assert not missing and not extra, f"{sum(missing.values())} ids missing, {sum(extra.values())} duplicated/extra"
    return sum(got.values())


def test_pseudolabel_actors_on_every_node_exactly_once(cluster, s3_bucket):
    uris, model, overrides = pseudolabel_setup(s3_bucket, shards=9, rows=4)
    out = f"{s3_bucket}/predictions/round=1"
    reply = cluster.call("pseudolabel", model=model, shards=uris, out=out, overrides=overrides,
                         trace=f"{s3_bucket}/actors")
    assert reply["actor_nodes"] == ["a", "b", "head"], reply
    assert reply["rows"] == 36 and reply["shards_computed"] == 9
    assert assert_each_id_once(uris, out) == 36


def test_pseudolabel_exactly_once_when_a_worker_node_is_lost(cluster, s3_bucket):
    uris, model, overrides = pseudolabel_setup(s3_bucket, shards=12, rows=4)
    out = f"{s3_bucket}/predictions/round=1"
    t0 = time.monotonic()
    reply = cluster.call("pseudolabel", timeout=300, model=model, shards=uris, out=out, overrides=overrides,
                         remove_node="b", gate=f"{s3_bucket}/gates/held", trace=f"{s3_bucket}/actors")
    assert reply["removed_after_s"] is not None, f"the actor on node b never held a shard: {reply}"
    assert reply["actor_nodes_before_removal"] == ["a", "b", "head"], reply
    assert len(reply["actor_nodes"]) == 4 and reply["actor_nodes"].count("b") == 1, reply  # + 1 restart
    assert reply["rows"] == 48 and reply["shards_computed"] == 12
    assert reply["actor_restarts"] >= 1, reply  # the actor of node b, restarted on a remaining node
    assert assert_each_id_once(uris, out) == 48
    print(f"node b removed {reply['removed_after_s']:.1f} s into the run; finished after "
          f"{time.monotonic() - t0:.1f} s")


def test_tune_sweep_on_two_nodes_survives_a_lost_node_without_rerunning_finished_trials(cluster, s3_bucket,
                                                                                      demo_dataset_s3):
    """Two trials (4 and 160 fine-tuning steps) at once, their Train workers on the two worker nodes (the head's CPUs
    held); once the short trial has completed and the long one has registered a checkpoint, the long one's node
    is removed. The sweep finishes with both trials completed; the finished trial started once (counted from the
    start records on S3), the lost one recovered (its Train worker replaced, or the trial rerun by Tune)."""
    space = TUNE_SPACE
    out, trace = f"{s3_bucket}/tune", f"{s3_bucket}/trial-starts"
    reply = cluster.call("tune", timeout=600, name="sweep", space=space, out=out, trace=trace, remove_node=True,
                         overrides=[*TUNE_TINY, f"data.path={demo_dataset_s3}", f"ray.storage_path={s3_bucket}/ray"])
    assert reply["workers_of_both_trials"] == ["a", "b"], reply  # the two trials on two different nodes
    assert reply["removed_after_s"] is not None, f"the long trial ended before its node could be removed: {reply}"
    rows = {r["trial_id"]: r for r in reply["rows"]}
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows.values()), reply
    short, lost = reply["finished_before"], reply["victim_trial"]
    assert len(short) == 1 and rows[short[0]]["finetune.steps"] == 4 and rows[lost]["finetune.steps"] == 160, reply
    # The finished trial was not run again: one start, no failure.
    assert len(reply["trial_starts"][short[0]]) == 1 and rows[short[0]]["failures"] == 0, reply
    # The lost one went on: a new Train worker (in the trial, from its checkpoint) or a rerun of the trial by Tune.
    reran = len(reply["trial_starts"][lost]) - 1
    assert len(reply["worker_nodes"]) >= 3 or reran >= 1, reply
    fs, path = rio.filesystem(out)
    fs.invalidate_cache()
    for trial in rows:  # every trial's report, and the experiment's results, on S3
        assert fs.exists(f"{path}/sweep/trials/{trial}/report.json")
    assert fs.exists(f"{path}/sweep/tune_results.md")
    print(f"node {reply['victim']} removed {reply['removed_after_s']:.1f} s into the sweep (the long trial's "
          f"checkpoint at step {reply['registered_step']}); trial starts {reply['trial_starts']}; Train workers on "
          f"{reply['worker_nodes']}; {reply['seconds']:.1f} s")


def test_nothing_written_to_the_driver_working_folder(cluster, workdir):
    """Last in the module: after pretraining and pseudo-labelling, the working folder the driver and every
    node (and so every worker) started in is still empty; all went to S3 (Ray's own files: RAY_TMPDIR)."""
    assert sorted(p.name for p in workdir.iterdir()) == []
