"""A three-node Ray cluster on this machine and a raysemi driver attached to it, in a process of its own.

``tests/test_multinode.py`` starts this script as a subprocess, so that the pytest process keeps its own
session Ray (one ``ray.init`` per process) and a Ray cluster started for these tests never becomes the
"current cluster" that a plain ``ray.init()`` elsewhere on the machine would join: ``RAY_TMPDIR`` (set by
the test) holds the address file and every node's own temp folder.

The nodes (``ray.cluster_utils.Cluster``): a head (1 logical CPU) and two workers (2 each), each with
a custom resource naming each (``node_head``, ``node_a``, ``node_b``) so that placement can be read back.
The head runs the dashboard on a free loopback port (the state API reads actors' nodes through it; every
node's processes get its address in ``RAY_API_SERVER_ADDRESS``). The S3 endpoint and credentials reach the
workers as on a real cluster: through the standard AWS environment of the processes that start the nodes.

Protocol: one JSON command a line on stdin, one ``@@ {json}`` line on stdout per command (everything else
goes to stderr). Commands: ``nodes``, ``train_node_loss``, ``pseudolabel``, ``tune`` (each of the
last two optionally losing a worker node mid-run) and ``quit``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

NODES = ("head", "a", "b")
NODE_ARGS = {"num_cpus": 2, "object_store_memory": 100 * 1024 * 1024}  # every node's
# The head has one CPU: room for an actor, not for a Train worker of 1.9 CPUs (Ray Train's elastic policy counts a
# node's total CPUs, not its free ones: CPUs held by another actor would still count as room for a worker).
HEAD_CPUS = 1

# Every trial is one supervised run (fine-tuning on the labelled rows, then evaluation): the Tune plumbing, not
# the method, is under test. A Train worker needs 1.9 of a node's 2 CPUs: two at once are on two nodes. DALI
# decodes (threads in the Train worker): with the torch loader, the restarted trial's DataLoader worker process
# hung on a futex, twice (not solved yet, see docs/cluster.md). Shared with bench/node_loss.py.
TUNE_TINY = [
    "run.mode=supervised", "model.backbone=test_resnet", "model.small_image=false", "data.image_size=32",
    "data.loader=dali", "data.num_threads=1", "finetune.batch_size=16", "finetune.eval_every=4",
    "finetune.warmup_steps=0", "finetune.checkpoint_every=1", "ray.num_workers=1", "ray.cpus_per_worker=1.9",
    "pseudolabel.num_actors=1", "pseudolabel.cpus_per_actor=1", "ray.max_failures=2",
]
# Pretraining and fine-tuning that lose a node: one Train worker per worker node (1.9 of a node's 2 CPUs; none fits
# on the head), DALI as above, a checkpoint every epoch (every 10 steps). Shared with bench/node_loss.py.
NODE_LOSS_PRETRAIN = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
    "model.pred_hidden_dim=64", "pretrain.warmup_epochs=0", "data.image_size=32", "data.loader=dali",
    "data.num_threads=1", "pretrain.batch_size=32", "pretrain.knn_every=0", "pretrain.checkpoint_every=1",
    "ray.placement_strategy=SPREAD", "ray.num_workers=2", "ray.cpus_per_worker=1.9", "ray.max_failures=2",
]
NODE_LOSS_FINETUNE = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
    "data.image_size=32", "data.loader=dali", "data.num_threads=1", "finetune.batch_size=32", "finetune.eval_every=5",
    "finetune.checkpoint_every=2", "finetune.warmup_steps=5", "ray.placement_strategy=SPREAD", "ray.num_workers=2",
    "ray.cpus_per_worker=1.9", "ray.max_failures=2",
]
# Two trials of different lengths: one completes while the other still runs (and can lose its node).
TUNE_SPACE = {"metric": "val_accuracy", "mode": "max", "params": {"finetune.steps": {"grid": [4, 160]}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster():
    from ray.cluster_utils import Cluster

    root = os.environ["RAY_TMPDIR"]
    # After a node loss, Ray Train's elastic policy may still count the lost node (it is marked dead a few seconds
    # after its workers are) and wait this long for the old worker count before it shrinks (Ray's default: 60 s).
    # The nodes' processes, Train's controller among them, inherit it.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    # Train's controller registers a reported checkpoint when it next polls its workers (Ray's default: every 2 s);
    # the tiny epochs here last about a second, so a node lost right after a registration would otherwise lose two.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.makedirs(os.path.join(root, "ray"), exist_ok=True)  # Ray writes the cluster's address file there
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # The nodes keep Ray's default node IP (the machine's address): a driver given a loopback GCS address
    # connects to the node IP anyway (Ray canonicalises 127.0.0.1 to it).
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE_ARGS, "num_cpus": HEAD_CPUS, "temp_dir": os.path.join(root, "head"), "resources": {"node_head": 1},
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            # Ray's fixed default (52365) is taken by any other Ray on the machine (the test session's own): the
            # head's agent then runs without its HTTP server, and the job API answers "No available agent".
            "dashboard_agent_listen_port": _free_port(),
            # a lost node is noticed in ~3 s instead of ~30 s (Ray's defaults: every 3 s, 5 misses... )
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = {"head": cluster.head_node}
    for name in NODES[1:]:
        add_node(cluster, nodes, name)
    cluster.wait_for_nodes()
    # Where `ray start --head` leaves it: a Ray job's supervisor finds its cluster's address ("auto") in the head's
    # own temp folder, else it looks for any GCS process on the machine (another Ray's, here).
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.head_node.gcs_address, os.path.join(root, "head"))
    return cluster, nodes


def add_node(cluster, nodes: dict, name: str, temp_name: str | None = None):
    """Start worker node ``name`` (custom resource ``node_<name>``) with its temp folder ``temp_name`` (default:
    ``name``; a replacement of a removed node needs a new one) under ``RAY_TMPDIR``; ``nodes[name]`` is set."""
    root = os.environ["RAY_TMPDIR"]
    nodes[name] = cluster.add_node(**NODE_ARGS, temp_dir=os.path.join(root, temp_name or name),
                                   resources={f"node_{name}": 1}, dashboard_agent_listen_port=_free_port())
    return nodes[name]


def node_names(nodes) -> dict[str, str]:
    return {node.node_id: name for name, node in nodes.items()}


def actor_nodes(class_name: str, names: dict[str, str]) -> list[str]:
    """The node (by name) of every actor of ``class_name`` the state API knows, alive or dead."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", class_name)], limit=1000, raise_on_missing_output=False)
    return sorted(names.get(a.node_id, a.node_id or "?") for a in actors)


def event_steps(uri: str) -> list[list[int]]:
    """The steps logged in each TensorBoard event file under ``uri`` (one file per rank-0 process of a stage, so
    one per worker group, oldest first)."""
    import struct

    from tensorboardX.proto import event_pb2

    from raysemi.core import io as rio
    from raysemi.core.event_log import event_files

    fs, path = rio.filesystem(uri)
    fs.invalidate_cache(path)
    files = []
    for name in event_files(uri):
        data, pos, steps = fs.cat_file(name), 0, []
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            if event.summary.value:
                steps.append(int(event.step))
        files.append(steps)
    return files


def _add_missing_nodes(cluster, nodes: dict, tag: str) -> None:
    """Add back the worker nodes an earlier command removed (a replacement: a fresh temp folder)."""
    for name in NODES[1:]:
        if name not in nodes:
            add_node(cluster, nodes, name, f"{name}-{tag}")
    cluster.wait_for_nodes()


class TrainStage(NamedTuple):
    fit: Callable[[], list[dict]]  # runs the stage, returns its history
    name: str  # its Ray Train run
    events: str  # its event folder
    unit: str  # "epoch" or "step"
    rows: int | None  # fine-tuning's training rows


def train_stage(stage: str, cfg) -> TrainStage:
    """Pretraining (in epochs), or round-0 fine-tuning on the labelled rows from a random init (in steps)."""
    from raysemi.core import io as rio
    from raysemi.stages import pretrain

    if stage == "pretrain":
        return TrainStage(lambda: pretrain.run(cfg).metrics, pretrain.run_name(cfg),
                          rio.join(cfg.run.output_dir, "pretrain"), "epoch", None)
    from raysemi.data.labels import label_split
    from raysemi.data.shards import read_manifest
    from raysemi.pipeline.rounds import labeled_trainset
    from raysemi.stages import finetune

    manifest = read_manifest(cfg.data.path)
    labels = label_split(cfg.data.path, cfg.data, manifest)
    out_dir, name = rio.join(cfg.run.output_dir, "finetune"), f"{cfg.run.name}-finetune"
    trainset = labeled_trainset(cfg, manifest, labels, out_dir)  # as finetune_only
    return TrainStage(lambda: finetune.run(cfg, trainset, None, out_dir, name, manifest.classes).history, name, out_dir,
                      "step", trainset.total)


def do_train_node_loss(args: dict, cluster, nodes) -> dict:
    """Pretraining or fine-tuning (``args["stage"]``) with one Train worker on each worker node
    (``ray.cpus_per_worker`` must take most of a node: the head has too few CPUs for one) that loses one of them
    (SIGKILL, as a spot node disappears) once the controller has registered a checkpoint. ``args["replace"]``:

    - ``"after_loss"``: a replacement node joins ``args["replace_after_s"]`` s after the loss: a fixed-size run waits
      for it and goes on with its full worker count;
    - ``"after_shrink"``: the replacement joins once the run (elastic, ``ray.min_workers=1``) has registered a
      checkpoint with one worker: the run shrank, goes on, and grows back;
    - ``None``: no replacement during the run (added by the next command that needs it).

    Returns, for every epoch (step) of the final history, its number and worker count (``done``, ``workers``), what
    each worker group logged (``groups``, rank 0's event files), the epoch (step) registered at the loss, and when
    the node was removed and replaced."""
    import ray

    from raysemi.core.config import load_config
    from raysemi.distributed import ray_session, ray_utils

    _add_missing_nodes(cluster, nodes, args.get("tag", "p"))
    names = node_names(nodes)
    cfg = load_config(None, [*args["overrides"], f"ray.address={cluster.address}"])
    ray_session.init_ray(cfg.ray.address)
    fit, name, events, unit, _ = train_stage(args.get("stage", "pretrain"), cfg)
    # Start on an idle cluster: an elastic run starts with the workers it finds room for, and an earlier command's
    # actors may still be ending on the nodes. (Its view of the nodes comes from Ray Data's autoscaling coordinator,
    # which looks at them every 20 s: a node added just before is not counted yet. The elastic test therefore runs
    # before any node is removed and replaced.)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < HEAD_CPUS + 2 * NODE_ARGS["num_cpus"] and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    run_dir = f"{ray_utils.storage_root(cfg)}/{name}"
    before = set(train_workers())
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["history"] = fit()
        except BaseException as err:  # reported to the caller, which fails with it
            outcome["error"] = f"{type(err).__name__}: {err}"

    def alive_workers() -> list[str]:
        return sorted(names.get(n, "?") for a, (n, st) in train_workers().items() if a not in before and st == "ALIVE")

    def registered() -> dict | None:
        snap = snapshot(run_dir)
        return snap.get("latest_checkpoint_result") if snap else None

    t0 = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    out: dict = {"unit": unit, "removed_after_s": None, "replaced_after_s": None, "victim": None}
    workers: list[str] = []
    while thread.is_alive() and not registered():
        if len(workers) < cfg.ray.num_workers:
            workers = alive_workers()
        time.sleep(0.3)
    out["workers_before"] = workers
    victim = next((n for n in workers if n != "head"), None)
    if thread.is_alive() and victim is not None:
        out.update(victim=victim, registered=int(registered()["metrics"][unit]))
        cluster.remove_node(nodes.pop(victim), allow_graceful=False)
        out["removed_after_s"] = time.monotonic() - t0
        if args.get("replace") == "after_loss":
            time.sleep(args.get("replace_after_s", 5.0))
        elif args.get("replace") == "after_shrink":
            while thread.is_alive() and (registered() or {}).get("metrics", {}).get("workers") != 1:
                time.sleep(0.3)
        if args.get("replace") and thread.is_alive():
            add_node(cluster, nodes, victim, f"{victim}-{args.get('tag', 'p')}r")
            out["replaced_after_s"] = time.monotonic() - t0
    thread.join()
    out["seconds"] = time.monotonic() - t0
    out["groups"] = event_steps(events)
    if "error" in outcome:
        return {**out, "error": outcome["error"]}
    history = outcome["history"]
    out.update(done=[h[unit] for h in history], workers=[h["workers"] for h in history])
    return out


def traced_predictor(trace_uri: str, victim_node_id: str | None, gate_uri: str | None):
    """A ``ShardPredictor`` that records its node and process under ``trace_uri`` as it starts, and that, on
    the node ``victim_node_id``, waits in its first shard until another actor has committed one, then writes
    ``gate_uri`` and holds until its node is removed (its restart elsewhere runs normally)."""
    import ray

    from raysemi.stages.predictor import ShardPredictor

    class TracedPredictor(ShardPredictor):
        def __init__(self, *args, **kwargs) -> None:
            from raysemi.core import io as rio

            super().__init__(*args, **kwargs)
            node = ray.get_runtime_context().get_node_id()
            rio.write_bytes_atomic(f"{trace_uri}/{node}.{os.getpid()}", b"")

        def run(self, index, shard_uri, out_uri, rows, *rest):
            if victim_node_id and ray.get_runtime_context().get_node_id() == victim_node_id:
                from raysemi.core import io as rio

                fs, path = rio.filesystem(out_uri)
                deadline = time.monotonic() + 120
                while not fs.glob(f"{path}/part-*.commit.json") and time.monotonic() < deadline:
                    fs.invalidate_cache()  # the other actors commit theirs meanwhile
                    time.sleep(0.2)
                rio.write_bytes_atomic(gate_uri, b"held")
                time.sleep(600)  # the node goes long before
            return super().run(index, shard_uri, out_uri, rows, *rest)

    return TracedPredictor


def do_pseudolabel(args: dict, cluster, nodes) -> dict:
    from raysemi.core import io as rio
    from raysemi.core.config import load_config
    from raysemi.stages.pseudolabel import predict_shards

    _add_missing_nodes(cluster, nodes, "q")
    cfg = load_config(None, [*args["overrides"], f"ray.address={cluster.address}"])
    names = node_names(nodes)
    victim = nodes.get(args.get("remove_node") or "")
    gate = args.get("gate")
    trace = args["trace"]
    predictor = traced_predictor(trace, victim.node_id if victim else None, gate)

    def actor_nodes() -> list[str]:
        fs, path = rio.filesystem(trace)
        fs.invalidate_cache()
        return sorted(names.get(p.rsplit("/", 1)[1].split(".")[0], "?") for p in fs.ls(path, detail=False))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = predict_shards(args["model"], args["shards"], args["out"], cfg, progress=False,
                                               predictor=predictor)
        except BaseException as err:  # reported to the test, which fails with it
            outcome["error"] = f"{type(err).__name__}: {err}"

    t0 = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    removed_after = None
    if victim is not None:
        # Wait on observable state: a shard is committed and the victim's actor holds one of its own.
        while thread.is_alive() and not rio.exists(gate):
            time.sleep(0.2)
        if rio.exists(gate):
            removed_after = time.monotonic() - t0
            actors_before = actor_nodes()
            # SIGKILL, no graceful shutdown: the node vanishes as a preempted spot instance does; Ray notices
            # through its missed health checks.
            cluster.remove_node(victim, allow_graceful=False)
            nodes.pop(args["remove_node"])
    thread.join()
    out: dict = {"seconds": time.monotonic() - t0, "removed_after_s": removed_after}
    if victim is not None:
        out["actor_nodes_before_removal"] = actors_before if removed_after is not None else None
    out["actor_nodes"] = actor_nodes()  # every actor process started, restarts included
    if "error" in outcome:
        out["error"] = outcome["error"]
    else:
        r = outcome["result"]
        out.update(rows=r.rows, shards_computed=r.shards_computed, actor_restarts=r.actor_restarts)
    return out


def traced_trial(trace_uri: str):
    """raysemi's Tune trial function, recording each start of a trial as ``<trace_uri>/<trial id>.<node id>.<pid>``
    before running the real trial: trial starts (first runs and reruns) are counted from S3, not from Tune."""
    from raysemi.tune import trial as tune_trial

    real = tune_trial.run_trial

    def run_trial(config, setup):
        import ray
        from ray import tune

        from raysemi.core import io as rio

        node = ray.get_runtime_context().get_node_id()
        rio.write_bytes_atomic(f"{trace_uri}/{tune.get_context().get_trial_id()}.{node}.{os.getpid()}", b"")
        return real(config, setup)

    return run_trial


def train_workers() -> dict[str, tuple[str, str]]:
    """actor id -> (node id, state) of every Ray Train worker the state API knows."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False)
    return {a.actor_id: (a.node_id, a.state) for a in actors}


def do_tune(args: dict, cluster, nodes) -> dict:
    """A Tune sweep of ``args["space"]`` (a space dict; trials of different lengths) with everything on S3. The
    head takes no trial work (its CPUs are held, as on a cluster whose head has ``--num-cpus=0``), missing worker
    nodes are added first, so that two trials whose Train worker needs most of a node run on the two worker
    nodes. With ``remove_node``: once a trial has completed and the other has registered a checkpoint, the node
    of that other trial's Train worker is removed (SIGKILL, no replacement)."""
    import ray
    import yaml
    from ray.tune import Callback

    from raysemi.core import io as rio
    from raysemi.core.config import load_config
    from raysemi.distributed import ray_session, ray_utils
    from raysemi.tune import experiment

    _add_missing_nodes(cluster, nodes, "t")
    names = node_names(nodes)
    cfg = load_config(None, [*args["overrides"], f"ray.address={cluster.address}"])
    ray_session.init_ray(cfg.ray.address)
    space_path = os.path.join(os.environ["RAY_TMPDIR"], f"{args['name']}.yaml")
    with open(space_path, "w") as fh:
        yaml.safe_dump(args["space"], fh)

    class Events(Callback):
        def __init__(self) -> None:
            self.events: list[tuple[str, str, dict]] = []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.events.append(("start", trial.trial_id, dict(trial.config)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.events.append(("complete", trial.trial_id, dict(trial.config)))

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.events.append(("recover", trial.trial_id, dict(trial.config)))

    holder = ray.remote(num_cpus=HEAD_CPUS, resources={"node_head": 1})(_Idle).remote()
    ray.get(holder.ready.remote())
    before = set(train_workers())
    events, outcome = Events(), {}
    real_trial = experiment.run_trial
    experiment.run_trial = traced_trial(args["trace"])

    def run() -> None:
        try:
            outcome["result"] = experiment.run_tune(cfg, space_path, out=args["out"], callbacks=[events])
        except BaseException as err:  # reported to the test, which fails with it
            outcome["error"] = f"{type(err).__name__}: {err}"

    t0 = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    out: dict = {"removed_after_s": None, "victim": None}
    try:
        both: list[str] = []
        while thread.is_alive() and len(both) < 2:  # both trials in their Train run at once
            both = sorted(names.get(n, "?") for a, (n, st) in train_workers().items()
                          if a not in before and st == "ALIVE")
            time.sleep(0.3)
        out["workers_of_both_trials"] = both
        if args.get("remove_node"):
            done = lambda: {t for k, t, _ in events.events if k == "complete"}  # noqa: E731
            while thread.is_alive() and not done():
                time.sleep(0.3)
            running = {t for k, t, _ in events.events if k == "start"} - done()
            long_trial = next(iter(running), None)
            snap = None
            while thread.is_alive() and long_trial and not (snap and snap.get("latest_checkpoint_result")):
                time.sleep(0.3)
                snap = snapshot(rio.join(ray_utils.storage_root(cfg), f"{long_trial}-round0"))
            alive = [names.get(n, "?") for a, (n, st) in train_workers().items() if a not in before and st == "ALIVE"]
            if thread.is_alive() and alive and alive[0] != "head":
                out.update(victim=alive[0], victim_trial=long_trial, finished_before=sorted(done()),
                           registered_step=int(snap["latest_checkpoint_result"]["metrics"]["step"]))
                cluster.remove_node(nodes.pop(alive[0]), allow_graceful=False)
                out["removed_after_s"] = time.monotonic() - t0
        thread.join()
    finally:
        experiment.run_trial = real_trial
        ray.kill(holder)
    out["seconds"] = time.monotonic() - t0
    out["worker_nodes"] = sorted(names.get(n, "?") for a, (n, _) in train_workers().items() if a not in before)
    out["events"] = [(k, t) for k, t, _ in events.events]
    if "error" in outcome:
        out["error"] = outcome["error"]
        return out
    summary = outcome["result"]
    out["rows"] = [{k: r.get(k) for k in ("trial_id", "status", "failures", *args["space"]["params"])}
                   for r in summary.rows]
    fs, path = rio.filesystem(args["trace"])
    fs.invalidate_cache()
    starts: dict[str, list[str]] = {}
    for p in fs.ls(path, detail=False):
        trial, node, _ = p.rsplit("/", 1)[1].split(".")
        starts.setdefault(trial, []).append(names.get(node, "?"))
    out["trial_starts"] = starts  # trial id -> the node of each start of its trial process
    return out


class _Idle:
    """An actor that only holds its resources (the head's CPUs during a sweep)."""

    def ready(self) -> bool:
        return True


def snapshot(run_dir: str) -> dict | None:
    """Ray Train's checkpoint manager snapshot of a run (None before its first registered checkpoint)."""
    from raysemi.core import io as rio

    fs, path = rio.filesystem(run_dir)
    try:
        fs.invalidate_cache(path)  # a driver in this process reads Ray Train's files through the same cached s3fs
        with fs.open(f"{path}/checkpoint_manager_snapshot.json", "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    finally:
        fs.invalidate_cache(path)


def main() -> None:
    import ray

    sys.stdout.reconfigure(line_buffering=True)
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's and raysemi's own lines go to stderr
    t0 = time.monotonic()
    cluster, nodes = start_cluster()
    started = time.monotonic() - t0
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["do"] == "quit":
                break
            if cmd["do"] == "nodes":
                reply = {"nodes": {name: n.node_id for name, n in nodes.items()}, "start_s": started,
                         "temp_dirs": {name: n.get_session_dir_path() for name, n in nodes.items()},
                         "dashboard": os.environ["RAY_API_SERVER_ADDRESS"]}
            elif cmd["do"] == "train_node_loss":
                reply = do_train_node_loss(cmd["args"], cluster, nodes)
            elif cmd["do"] == "pseudolabel":
                reply = do_pseudolabel(cmd["args"], cluster, nodes)
            elif cmd["do"] == "tune":
                reply = do_tune(cmd["args"], cluster, nodes)
            else:
                reply = {"error": f"unknown command {cmd['do']!r}"}
        except Exception:
            reply = {"error": traceback.format_exc()}
        print("@@ " + json.dumps(reply), file=stdout, flush=True)
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
