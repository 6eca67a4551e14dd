"""Losing a worker node mid-run on a real multi-node Ray cluster (3 nodes on this machine), data on S3.

    python bench/node_loss.py [--tries 3] [--kinds pretrain,pretrain-replaced,...] [--out bench/results/node_loss.json]

Starts a moto S3 server on a free loopback port and the 3-node cluster of ``tests/multinode_cluster.py``
(a head with 1 logical CPU, nodes ``a``, ``b`` with 2 each), ingests the generated demo set to S3, then for every try:

(a) pretraining: 2 Train workers with ``ray.placement_strategy=SPREAD``, 4 epochs, a checkpoint every epoch,
    ``ray.max_failures=2``. Once the controller has *registered* a checkpoint (``checkpoint_manager_snapshot.json``
    has a ``latest_checkpoint_result``), the node of a non-head worker is removed (SIGKILL, no graceful shutdown).
    Recorded: finished, the epoch of the checkpoint registered at the kill, the epochs the first worker group had
    completed (registered + uploaded-not-yet-registered checkpoints), the restored group's ``start_epoch``,
    epochs lost = completed epochs run twice, wall time.
(b) fine-tuning: round 0 (labelled rows, random init), 2 Train workers, SPREAD, 40 steps validated every 5, a
    checkpoint every 2 intervals, ``ray.max_failures=2``, a node removed as in (a). Recorded as in (a), in steps:
    the first group's last step and the restored group's first (less one interval) come from the rank-0 event
    files (one per worker group).
(c) pseudo-labelling: the actor pool (3 actors, SPREAD) over every shard of the S3 data set; the actor on a worker
    node holds its first shard until another shard is committed on S3, then its node is removed (the scenario
    of ``tests/test_multinode.py``). Recorded: finished, actor restarts, ids expected / predicted / missing /
    duplicated (counted here from the prediction Parquet files), wall time.
(d) a Tune sweep (``raysemi.tune.run_tune``, experiment and trials on S3) of two supervised trials of 4 and 160
    fine-tuning steps (``TUNE_SPACE``), each Train worker needing most of a node, the head's CPUs held: the two
    trials run on nodes ``a`` and ``b`` at once. Once the short trial has completed and the long one has
    registered a checkpoint, the long one's node is removed (``do_tune`` of ``tests/multinode_cluster.py``, as
    the sweep test). Recorded: finished (both trials completed), starts of each trial's process (recorded on
    S3: the completed trial must start once), how the lost trial went on (its Train worker replaced inside the
    trial, or the trial started again by Tune), wall time.

(e) pretrain-replaced, (f) finetune-replaced: 2 Train workers of 1.9 CPUs (one per worker node: the head has 1 CPU),
    a fixed worker count, 8 epochs (80 steps, a checkpoint every 10), DALI. Once a checkpoint is registered, one
    worker node is removed and a replacement joins 5 s later: the run waits for it and goes on with 2 workers
    (``do_train_node_loss`` of ``tests/multinode_cluster.py``). Recorded: finished, the workers of every epoch
    (step interval) of the final history, epochs (steps) run twice (from the rank-0 event file of every worker group).
(g) pretrain-elastic, (h) finetune-elastic: the same with ``ray.min_workers=1`` (elastic), 16 epochs (160 steps): the
    run goes on with one worker; once it has registered a checkpoint with one worker, the replacement joins and the
    run grows back to 2 (``ray.resize_interval_s=2``). Recorded as in (e), and whether it shrank and grew back.

In (a)-(d) the removed node is replaced (a fresh node with the same name and resource) after the run has ended, so
the run itself recovers on the 2 remaining nodes and the next try starts on 3 again. Prints a Markdown table and writes
every try with machine information to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import multinode_cluster as mc  # noqa: E402
from moto_s3 import MotoStartError, moto_s3  # noqa: E402

from raysemi.core import io as rio  # noqa: E402
from raysemi.core.config import load_config  # noqa: E402
from raysemi.core.tables import markdown_table  # noqa: E402
from raysemi.data.shards import read_manifest, read_shard  # noqa: E402

MODEL = ["model.backbone=test_resnet", "model.small_image=false"]
PRETRAIN = [*MODEL, "model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64",
            "pretrain.warmup_epochs=0", "ray.placement_strategy=SPREAD", "ray.num_workers=2", "data.loader=torch",
            "pretrain.epochs=4", "pretrain.batch_size=32", "pretrain.knn_every=0", "pretrain.checkpoint_every=1",
            "ray.max_failures=2"]
FINETUNE = [*MODEL, "model.proj_hidden_dim=64", "model.proj_dim=32", "ray.placement_strategy=SPREAD",
            "ray.num_workers=2", "data.loader=torch", "finetune.steps=40", "finetune.eval_every=5",
            "finetune.checkpoint_every=2", "finetune.warmup_steps=5", "finetune.batch_size=32", "ray.max_failures=2"]
KINDS = ("pretrain", "pretrain-replaced", "pretrain-elastic", "finetune", "finetune-replaced", "finetune-elastic",
         "pseudolabel", "tune")

PSEUDOLABEL = [*MODEL, "model.proj_hidden_dim=32", "model.proj_dim=16", "data.image_size=32", "data.loader=torch",
               "pseudolabel.num_actors=3", "pseudolabel.batch_size=4", "ray.placement_strategy=SPREAD"]


def checkpoint_dirs(run_dir: str) -> set[str]:
    fs, path = rio.filesystem(run_dir)
    fs.invalidate_cache(path)
    return {p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[1].startswith("checkpoint_")}


def worker_nodes(names: dict[str, str]) -> list[str]:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100,
                        raise_on_missing_output=False)
    return sorted(names.get(a.node_id, "?") for a in alive)


def run_with_kill(fn, run_dir: str, cluster, nodes: dict, rec: dict, tag: str, at_kill) -> dict[str, Any]:
    """Run ``fn`` in a thread; once the controller has registered a checkpoint, remove the node of a non-head Train
    worker and call ``at_kill(snapshot)``; after the run, add a replacement node. Returns ``result`` or ``error``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as err:  # recorded: a failed run is a figure, not a crash of the bench
            out["error"] = f"{type(err).__name__}: {err}"

    t0 = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    snap, workers, names = None, [], mc.node_names(nodes)
    while thread.is_alive() and not (snap and snap.get("latest_checkpoint_result")):
        time.sleep(0.3)
        if len(workers) < 2:  # read before the kill, so that nothing delays it
            workers = worker_nodes(names)
        snap = mc.snapshot(run_dir)
    victim = next((n for n in workers if n != "head"), None)
    rec.update(worker_nodes=workers, victim=victim)
    if thread.is_alive() and victim is not None:
        cluster.remove_node(nodes.pop(victim), allow_graceful=False)
        rec["removed_after_s"] = round(time.monotonic() - t0, 1)
        at_kill(snap)
    thread.join()
    rec["seconds"] = round(time.monotonic() - t0, 1)
    if "removed_after_s" in rec:
        mc.add_node(cluster, nodes, rec["victim"], f"{rec['victim']}{tag}")
    if "error" in out:
        rec["error"] = out["error"]
    return out


def pretrain_try(k: int, bucket: str, data: str, cluster, nodes: dict) -> dict[str, Any]:
    from raysemi.distributed import ray_utils
    from raysemi.stages import pretrain

    cfg = load_config(None, [*PRETRAIN, f"data.path={data}", f"run.output_dir={bucket}/pretrain-{k}",
                             f"ray.storage_path={bucket}/ray", f"run.name=try{k}", f"ray.address={cluster.address}"])
    run_dir = rio.join(ray_utils.storage_root(cfg), pretrain.run_name(cfg))
    rec: dict[str, Any] = {"kind": "pretrain", "try": k, "finished": False, "replacement": "after the run"}

    def at_kill(snap: dict) -> None:
        # The surviving worker cannot finish an epoch without its DDP peer: these are the first group's figures.
        done = checkpoint_dirs(run_dir)  # uploaded checkpoints: one per epoch the first group completed
        snap = mc.snapshot(run_dir) or snap
        registered = {c["checkpoint_dir_name"] for c in snap["checkpoint_results"]}
        reg_epoch = int(snap["latest_checkpoint_result"]["metrics"]["epoch"])
        rec.update(registered_epoch=reg_epoch, epochs_done_at_kill=reg_epoch + 1 + len(done - registered))

    out = run_with_kill(lambda: pretrain.run(cfg), run_dir, cluster, nodes, rec, f"p{k}", at_kill)
    if "error" not in out:
        hist = out["result"].metrics
        rec.update(finished=True, epochs=[h["epoch"] for h in hist], start_epoch=hist[-1]["start_epoch"])
        if "epochs_done_at_kill" in rec:
            rec["epochs_lost"] = max(0, rec["epochs_done_at_kill"] - rec["start_epoch"])
    return rec


def finetune_try(k: int, bucket: str, data: str, cluster, nodes: dict) -> dict[str, Any]:
    from raysemi.distributed import ray_utils

    cfg = load_config(None, [*FINETUNE, f"data.path={data}", f"run.output_dir={bucket}/finetune-{k}",
                             f"ray.storage_path={bucket}/ray", f"run.name=ft{k}", f"ray.address={cluster.address}"])
    stage = mc.train_stage("finetune", cfg)
    run_dir = rio.join(ray_utils.storage_root(cfg), stage.name)
    rec: dict[str, Any] = {"kind": "finetune", "try": k, "finished": False, "replacement": "after the run",
                           "init": "random", "trainset_rows": stage.rows}
    out = run_with_kill(stage.fit, run_dir, cluster, nodes, rec, f"f{k}",
                        lambda snap: rec.update(registered_step=int(snap["latest_checkpoint_result"]["metrics"]["step"])))
    if "error" not in out:
        history, groups = out["result"], mc.event_steps(stage.events)
        rec.update(finished=True, steps=history[-1]["step"], history_steps=[h["step"] for h in history],
                   steps_per_group=groups)
        if "registered_step" in rec and len(groups) > 1 and groups[0] and groups[1]:
            start = groups[1][0] - cfg.finetune.eval_every  # every interval is eval_every steps (40 = 8 x 5)
            rec.update(steps_done_at_kill=groups[0][-1], start_step=start,
                       steps_lost=rerun(groups, cfg.finetune.eval_every))
    return rec


def pseudolabel_try(k: int, bucket: str, data: str, model: str, cluster, nodes: dict) -> dict[str, Any]:
    import pyarrow.parquet as pq

    manifest = read_manifest(data)
    shards = [rio.join(data, s.path) for split in manifest.splits.values() for s in split.shards]
    victim = "b" if k % 2 else "a"
    out = f"{bucket}/predictions/try={k}"
    t0 = time.monotonic()
    reply = mc.do_pseudolabel({"overrides": PSEUDOLABEL, "remove_node": victim, "gate": f"{bucket}/gates/{k}",
                               "trace": f"{bucket}/actors/{k}", "model": model, "shards": shards, "out": out},
                              cluster, nodes)
    rec: dict[str, Any] = {"kind": "pseudolabel", "try": k, "victim": victim, "shards": len(shards),
                           "finished": "error" not in reply, "seconds": round(time.monotonic() - t0, 1),
                           "removed_after_s": reply["removed_after_s"], "replacement": "after the run",
                           **{key: reply.get(key) for key in ("error", "actor_restarts", "actor_nodes") if key in reply}}
    if victim not in nodes:
        mc.add_node(cluster, nodes, victim, f"{victim}q{k}")
    expected = collections.Counter(i for u in shards for i in read_shard(u, ["id"]).column("id").to_pylist())
    fs, path = rio.filesystem(out)
    fs.invalidate_cache()
    got: collections.Counter = collections.Counter()
    for part in fs.glob(f"{path}/part-*.parquet"):
        got.update(pq.read_table(part, filesystem=fs, columns=["id"]).column("id").to_pylist())
    rec.update(ids_expected=sum(expected.values()), ids_predicted=sum(got.values()),
               ids_missing=sum((expected - got).values()), ids_duplicated=sum((got - expected).values()))
    return rec


def rerun(groups: list[list[int]], interval: int) -> int:
    """Epochs (steps) run twice: what each worker group logged (at the end of every ``interval``) at or after the
    first epoch (step) the next group ran."""
    return sum(max(0, prev[-1] - (nxt[0] - interval)) for prev, nxt in itertools.pairwise(groups) if prev and nxt)


def train_node_loss_try(kind: str, k: int, bucket: str, data: str, cluster, nodes: dict) -> dict[str, Any]:
    """(e)-(h): a run with one Train worker per worker node loses a node; a replacement joins (fixed size), or the run
    shrinks and the replacement joins once it has (elastic)."""
    stage, mode = kind.split("-")
    elastic = mode == "elastic"
    if stage == "pretrain":
        overrides, interval = [*mc.NODE_LOSS_PRETRAIN, f"pretrain.epochs={16 if elastic else 8}"], 1
    else:
        overrides, interval = [*mc.NODE_LOSS_FINETUNE, f"finetune.steps={160 if elastic else 80}"], 5
    overrides += [f"data.path={data}", f"run.name={kind}{k}", f"run.output_dir={bucket}/{kind}-{k}",
                  f"ray.storage_path={bucket}/ray"]
    if elastic:
        overrides += ["ray.min_workers=1", "ray.resize_interval_s=2"]
    reply = mc.do_train_node_loss({"stage": stage, "overrides": overrides, "tag": f"{kind[0]}{mode[0]}{k}",
                                   "replace": "after_shrink" if elastic else "after_loss", "replace_after_s": 5},
                                  cluster, nodes)
    unit = reply["unit"]
    rec: dict[str, Any] = {"kind": kind, "try": k, "finished": "error" not in reply, "unit": unit,
                           "replacement": "once the run shrank" if elastic else "5 s after the loss",
                           **{key: reply.get(key) for key in ("error", "victim", "workers_before", "registered",
                                                              "removed_after_s", "replaced_after_s", "done",
                                                              "workers", "groups") if key in reply}}
    rec["seconds"] = round(reply["seconds"], 1)
    if rec["finished"]:
        rec[f"{unit}s_lost"] = rerun(reply["groups"], interval)
        if elastic:
            rec.update(shrank=1 in reply["workers"], grew_back=reply["workers"][-1] == 2)
    return rec


def tune_try(k: int, bucket: str, data: str, cluster, nodes: dict) -> dict[str, Any]:
    reply = mc.do_tune({"name": f"sweep{k}", "space": mc.TUNE_SPACE, "out": f"{bucket}/tune-{k}",
                        "trace": f"{bucket}/trial-starts-{k}", "remove_node": True,
                        "overrides": [*mc.TUNE_TINY, f"data.path={data}", f"ray.storage_path={bucket}/ray-tune{k}"]},
                       cluster, nodes)
    rec: dict[str, Any] = {"kind": "tune", "try": k, "replacement": "before the next try",
                           "seconds": reply["seconds"], "victim": reply.get("victim"),
                           "removed_after_s": reply.get("removed_after_s"),
                           "registered_step": reply.get("registered_step"),
                           "workers_of_both_trials": reply.get("workers_of_both_trials")}
    if "error" in reply:
        return {**rec, "finished": False, "error": reply["error"]}
    starts = reply["trial_starts"]
    done_before, lost = reply.get("finished_before") or [], reply.get("victim_trial")
    rec.update(finished=all(r["status"] == "completed" for r in reply["rows"]) and len(reply["rows"]) == 2,
               node_removed=reply.get("victim") is not None,
               finished_trials_rerun=sum(len(starts.get(t, [])) - 1 for t in done_before),
               lost_trial_starts=len(starts.get(lost, [])) if lost else None,
               train_worker_nodes=reply["worker_nodes"])
    return rec


def summary(tries: list[dict]) -> list[list[Any]]:
    rows = []
    for kind in KINDS:
        t = [r for r in tries if r["kind"] == kind]
        if not t:
            continue
        lost = [r[key] for r in t for key in ("epochs_lost", "steps_lost") if key in r]
        rows.append([kind, f"{sum(r['finished'] for r in t)}/{len(t)}",
                     f"{sum(lost) / len(lost):.2f}" if lost else "-", max(lost) if lost else "-",
                     sum(r.get("ids_missing", 0) for r in t) if kind == "pseudolabel" else "-",
                     sum(r.get("ids_duplicated", 0) for r in t) if kind == "pseudolabel" else "-",
                     sum(r.get("finished_trials_rerun", 0) for r in t) if kind == "tune" else "-",
                     f"{sum(r.get('shrank', 0) for r in t)} / {sum(r.get('grew_back', 0) for r in t)}"
                     if kind.endswith("elastic") else "-",
                     f"{sum(r['seconds'] for r in t) / len(t):.1f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, from " + ",".join(KINDS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "node_loss.json"))
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds: choose among {','.join(KINDS)}")
    import ray
    import s3fs

    load_before, t_start = os.getloadavg(), time.monotonic()
    os.environ.pop("RAY_ADDRESS", None)
    # The nodes' workers import what the sweep's remote classes and functions come from (multinode_cluster).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rnl", dir="/tmp")  # short: Ray's unix sockets live there
    work = tempfile.mkdtemp(prefix="node-loss-")
    moto, cluster, tries = contextlib.ExitStack(), None, []
    try:
        try:
            s3 = moto.enter_context(moto_s3())
        except MotoStartError as err:
            raise SystemExit(f"bench/node_loss.py: error: {err}") from None
        os.environ.update(s3.env)  # the driver's and, through the processes that start the nodes, the workers'
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}).mkdir("node-loss")
        bucket, data = "s3://node-loss", "s3://node-loss/dataset"
        from raysemi.data.ingest.run import ingest
        from raysemi.data.synthetic import GROUP_REGEX, make_demo_dataset
        from raysemi.models.checkpoint import build_classifier, save_classifier

        make_demo_dataset(work, per_class=60, unlabeled=60, size=32, seed=0)
        ingest(str(Path(work) / "images" / "SYNTHETIC-demo"), data, group_regex=GROUP_REGEX, seed=0, progress=False)
        classes = read_manifest(data).classes
        plcfg = load_config(None, PSEUDOLABEL)
        model = f"{bucket}/models/classifier.safetensors"
        save_classifier(model, build_classifier(plcfg, len(classes)), plcfg, classes)
        cluster, nodes = mc.start_cluster()
        runs = {"pretrain": lambda k: pretrain_try(k, bucket, data, cluster, nodes),
                "finetune": lambda k: finetune_try(k, bucket, data, cluster, nodes),
                "pseudolabel": lambda k: pseudolabel_try(k, bucket, data, model, cluster, nodes),
                "tune": lambda k: tune_try(k, bucket, data, cluster, nodes),
                **{kind: functools.partial(train_node_loss_try, kind, bucket=bucket, data=data, cluster=cluster,
                                           nodes=nodes) for kind in KINDS if "-" in kind}}
        for kind in (kind for kind in KINDS if kind in kinds):
            for k in range(args.tries):
                tries.append(runs[kind](k))
                print(json.dumps(tries[-1]), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        moto.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    rows = summary(tries)
    print("\n".join(markdown_table(["kind", "runs finished", "mean epochs (steps) lost", "max epochs (steps) lost",
                                    "ids missing", "ids duplicated", "finished trials rerun", "runs shrunk / grown back",
                                    "mean wall s"],
                                   rows)))
    command = f"python bench/node_loss.py --tries {args.tries}" + ("" if kinds == list(KINDS) else f" --kinds {args.kinds}")
    if Path(args.out).resolve() != (ROOT / "bench" / "results" / "node_loss.json").resolve():
        command += f" --out {args.out}"
    result = {"command": command, "summary": rows, "tries": tries,
              "seconds": round(time.monotonic() - t_start, 1),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "ray": ray.__version__, "load_average_before": load_before,
                          "load_average_after": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
