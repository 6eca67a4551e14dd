"""Scale of a pseudo-label round's data plane: the driver's wall time, memory, bytes read and S3 requests.

What a round does around the actors' predictions (``raysemi.pipeline``), step by step, on synthetic datasets of
N rows written by the project's own shard writer (1 KB stand-in images, 1,000 rows per shard, the ``train``
split half labelled, ``data.label_fraction`` 0.1) and prediction shards committed through the commit protocol
(``stages.commits.commit``, ids checked) as the actors would. Every per-row step runs in Ray tasks (a private
local Ray, 2 CPUs here); the driver handles per-shard summaries:

- ``label choice``: ``data.labels.label_split`` (the manifest's class counts, then the k-th rank key of each
  class over the train shards: a few task maps);
- ``exactly-once check``: ``stages.commits.verify_exactly_once`` (one listing, the markers fetched together);
- ``selection``: ``stages.pool.select`` (candidates per class, then the thresholds of the ``prior`` selection
  of a quarter of the pool, in narrowing passes);
- ``labelled set``: the chosen labels' training set (``data.trainset.write_trainset`` of ``LabeledRows``),
  written once per run;
- ``pseudo-label set``: the round's chosen rows with soft targets (count, then one task per part).

Each step runs in a fresh process (so one step's memory does not count against the next) that first imports
everything, starts Ray and builds its inputs, then runs the step alone while a thread samples its resident
memory every 10 ms (after one unmeasured run of the step: Ray's worker start-up and the process's lazy
imports are paid once per driver, not per row). Per step: wall seconds, the driver's peak RSS above the RSS just before the step, the bytes
the driver read (``rchar`` of ``/proc/self/io``; on local disk: S3 reads come over sockets), the task maps it
ran, and with ``--s3`` the S3 requests the driver sent (botocore's ``before-send``) per input shard, beside the
requests the moto server received from everyone (its log). No model, no decoding; ``ingest`` and ``predict``
are not measured here (their bookkeeping still runs in one process: issue #23, items 4 and 5).

    .venv/bin/python bench/scale.py                          # 100k and 1M rows, local disk
    .venv/bin/python bench/scale.py --s3                     # and on the moto S3 server (100k: --s3-max-rows)

Writes ``bench/results/scale.json`` and ``bench/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS_PER_SHARD = 1000
IMAGE_BYTES = 1024
CLASSES = ["a", "b", "c"]
STEPS = ("label choice", "exactly-once check", "selection", "labelled set", "pseudo-label set")
LABEL_FRACTION = 0.1
BUDGET = 0.25


# ---------------------------------------------------------------- data


def generate(root: str, rows: int, seed: int = 0, input_root: str | None = None) -> None:
    """A dataset of ``rows`` train rows (half labelled) in shards of ``ROWS_PER_SHARD``, a one-shard val and
    test split, and one committed prediction shard per train shard under ``<root>/predictions`` (its marker
    naming the input under ``input_root``: where the dataset will be read from, default ``root``)."""
    import numpy as np
    import pyarrow as pa

    from raysemi.data.shards import SCHEMA, Manifest, SplitInfo, write_manifest, write_shard
    from raysemi.stages import commits

    rng = np.random.default_rng(seed)
    splits: dict[str, SplitInfo] = {}
    pred_root = f"{root}/predictions"
    for split, n in (("train", rows), ("val", ROWS_PER_SHARD), ("test", ROWS_PER_SHARD)):
        info = SplitInfo(label_counts=dict.fromkeys(CLASSES, 0))
        for index, start in enumerate(range(0, n, ROWS_PER_SHARD)):
            m = min(ROWS_PER_SHARD, n - start)
            blobs = rng.integers(0, 256, size=(m, IMAGE_BYTES), dtype=np.uint8)
            ids = [f"{split}-{start + i:09d}-{seed}" for i in range(m)]  # unique, as sha256 ids are
            labels = rng.integers(0, len(CLASSES), size=m)
            keep = np.ones(m, bool) if split != "train" else rng.random(m) < 0.5
            table = pa.table({
                "id": pa.array(ids, pa.string()),
                "image": pa.array([b.tobytes() for b in blobs], pa.binary()),
                "label": pa.array([int(y) if k else None for y, k in zip(labels, keep)], pa.int16()),
                "group": pa.array([None] * m, pa.string()),
                "source": pa.array(ids, pa.string()),
            }, schema=SCHEMA)
            shard = write_shard(root, f"{split}/part-{index:05d}.parquet", table)
            info.shards.append(shard)
            info.rows += m
            info.labeled += int(keep.sum())
            for y in labels[keep]:
                info.label_counts[CLASSES[int(y)]] += 1
            if split == "train":
                probs = rng.dirichlet(np.ones(len(CLASSES)) * 0.3, size=m).astype(np.float32)
                pred = pa.table({
                    "id": pa.array(ids, pa.string()), "pred": pa.array(probs.argmax(1), pa.int16()),
                    "confidence": pa.array(probs.max(1), pa.float32()),
                    "probs": pa.array(list(probs), pa.list_(pa.float32())),
                })
                commits.commit(pred_root, index, f"{input_root or root}/{shard.path}", pred, "0" * 64, shard.sha256,
                               input_ids=table.column("id"))
        splits[split] = info
    write_manifest(root, Manifest(classes=CLASSES, splits=splits, synthetic=True))


# ---------------------------------------------------------------- one step, in a fresh process


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _requests(log: str | None) -> int:
    if not log:
        return 0
    with open(log, "rb") as fh:
        return sum(1 for line in fh if b'HTTP/1.1"' in line)


def run_step(step: str, root: str, work: str, moto_log: str | None) -> dict[str, Any]:
    """Build the step's inputs and start Ray (not measured), then run the step alone (measured)."""
    from raysemi import ray_tasks, ray_utils
    from raysemi.config import DataConfig
    from raysemi.data.labels import label_split
    from raysemi.data.shards import read_manifest
    from raysemi.data.trainset import LabeledRows, count_rows, write_trainset
    from raysemi.stages import pool
    from raysemi.stages.commits import verify_exactly_once
    from raysemi.stages.selection import budget_count, selection_prior

    manifest = read_manifest(root)
    pred_uri = f"{root}/predictions"
    data = DataConfig(path=root, label_fraction=LABEL_FRACTION)
    shards = pool.pool_shards(root, manifest, pred_uri)
    uris = [s.uri for s in shards]
    state: dict[str, Any] = {}
    maps = [0]
    ray_utils.init_ray(None)
    remote = ray_tasks.task_mapper(None)

    def tasks(fn, args):
        maps[0] += 1
        return remote(fn, args)

    def prepare(upto: str) -> None:
        order = STEPS.index(upto)
        if order > 0:
            state["labels"] = label_split(root, data, manifest, remote)
            state["view"] = pool.PoolView(state["labels"].rule, len(CLASSES), 0.0)
        if order > 3:
            labels = state["labels"]
            state["rule"] = pool.select(shards, state["view"], budget_count(BUDGET, labels.pool_rows),
                                        selection_prior("prior", labels.labeled_counts), remote)[0]

    def act() -> Any:
        if step == "label choice":
            return label_split(root, data, manifest, tasks)
        if step == "exactly-once check":
            return verify_exactly_once(pred_uri, uris, [s.rows for s in shards])
        labels = state["labels"]
        if step == "selection":
            return pool.select(shards, state["view"], budget_count(BUDGET, labels.pool_rows),
                               selection_prior("prior", labels.labeled_counts), tasks)
        if step == "labelled set":
            return write_trainset(LabeledRows(labels.rule, len(CLASSES)), shards, f"{work}/labelled", 4, tasks)
        source = pool.PseudoRows(state["view"], state["rule"], 1.0, temperature=0.5)
        return write_trainset(source, shards, f"{work}/pseudo", 4, tasks, soft=True,
                              counted=count_rows(source, shards, tasks))

    prepare(step)
    act()  # once unmeasured: the worker processes' start, this process's lazy imports, the remote functions
    maps[0] = 0
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    sent: list[str] = []
    if moto_log:  # the requests this process (the driver) sends; the moto log counts the tasks' too
        from raysemi.io import filesystem

        fs, _ = filesystem(root)
        fs.s3.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
    base_rss, base_read, base_req = _rss(), _rchar(), _requests(moto_log)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    act()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"step": step, "seconds": wall, "peak_rss_over_start_mib": max(0, max(peak[0], _rss()) - base_rss) / 2**20,
            "driver_bytes_read_mib": (_rchar() - base_read) / 2**20, "driver_s3_requests": len(sent),
            "s3_requests_all": _requests(moto_log) - base_req, "task_maps": maps[0], "input_shards": len(uris)}


# ---------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log, "wb") as err:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the moto server did not start")


def measure(root: str, work: str, env: dict[str, str], moto_log: str | None) -> list[dict[str, Any]]:
    out = []
    for step in STEPS:
        proc = subprocess.run([sys.executable, __file__, "--child", step, root, work, moto_log or ""],
                              env=env, capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEP ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(lines[-1][5:]))
        o = out[-1]
        print(f"  {step:<20} {o['seconds']:8.2f} s  +{o['peak_rss_over_start_mib']:7.0f} MiB  "
              f"read {o['driver_bytes_read_mib']:8.1f} MiB  maps {o['task_maps']}  "
              f"S3 requests {o['driver_s3_requests']} (all {o['s3_requests_all']})", flush=True)
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    info["bf16_flags"] = sorted(f for f in flags if f in ("amx_bf16", "avx512_bf16", "amx_tile"))
    import pyarrow
    import ray

    info.update(pyarrow=pyarrow.__version__, ray=ray.__version__)
    return info


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        step, root, work, log = sys.argv[2:6]
        print("STEP " + json.dumps(run_step(step, root, work, log or None)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--s3", action="store_true", help="also on a moto S3 server on loopback")
    ap.add_argument("--s3-max-rows", type=int, default=100_000,
                    help="sizes above this run on local disk only (moto holds every object in its memory)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    results: dict[str, Any] = {"machine": machine(), "rows_per_shard": ROWS_PER_SHARD, "image_bytes": IMAGE_BYTES,
                               "label_fraction": LABEL_FRACTION, "budget": BUDGET, "runs": []}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results["revision"] = commit.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="raysemi-scale-") as tmp:
        for rows in args.rows:
            root = f"{tmp}/ds-{rows}"
            t0 = time.perf_counter()
            generate(root, rows)
            print(f"{rows:,} rows generated in {time.perf_counter() - t0:.0f} s; local disk:", flush=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
            results["runs"].append({"rows": rows, "storage": "local",
                                    "steps": measure(root, f"{tmp}/work-{rows}", env, None)})
            if args.s3 and rows <= args.s3_max_rows:
                log = f"{tmp}/moto-{rows}.log"
                proc, endpoint = start_moto(log)
                try:
                    s3env = {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                             "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                             "AWS_EC2_METADATA_DISABLED": "true"}
                    staged = f"{tmp}/s3-{rows}"  # the same rows, its markers naming the inputs by their S3 URIs
                    generate(staged, rows, input_root="s3://scale/ds")
                    subprocess.run([sys.executable, "-c", (
                        "import s3fs, sys; fs = s3fs.S3FileSystem(); fs.mkdir('scale'); "
                        "fs.put(sys.argv[1], 'scale/ds', recursive=True)"), staged], env=s3env, check=True)
                    subprocess.run(["rm", "-rf", staged], check=False)
                    print(f"{rows:,} rows on S3 ({endpoint}):", flush=True)
                    results["runs"].append({"rows": rows, "storage": "s3", "steps": measure(
                        "s3://scale/ds", f"s3://scale/work-{rows}", s3env, log)})
                finally:
                    proc.kill()
            Path(root).exists() and subprocess.run(["rm", "-rf", root], check=False)
    write(results, Path(args.out))


def write(results: dict[str, Any], out: Path) -> None:
    from raysemi.tables import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    header = ["rows", "storage", "step", "seconds", "driver peak RSS over start (MiB)", "driver bytes read (MiB)",
              "task maps", "driver S3 requests / shard", "all S3 requests / shard"]
    body = []
    for run in results["runs"]:
        for s in run["steps"]:
            s3 = run["storage"] == "s3"
            body.append([f"{run['rows']:,}", run["storage"], s["step"], f"{s['seconds']:.2f}",
                         f"{s['peak_rss_over_start_mib']:.0f}", "" if s3 else f"{s['driver_bytes_read_mib']:.1f}",
                         str(s["task_maps"]),
                         f"{s['driver_s3_requests'] / s['input_shards']:.2f}" if s3 else "",
                         f"{s['s3_requests_all'] / s['input_shards']:.1f}" if s3 else ""])
    m = results["machine"]
    text = (f"# A round's data plane at scale (`bench/scale.py`, revision {results['revision']})\n\n"
            f"{m.get('cpu_model', '?')}, {m['cpus']} cores, bf16 flags: {', '.join(m['bf16_flags']) or 'none'}; "
            f"{results['rows_per_shard']:,} rows per shard, {results['image_bytes']} B images, "
            f"label fraction {results['label_fraction']}, budget {results['budget']} of the pool.\n\n"
            + "\n".join(markdown_table(header, body, ["r", "l", "l", "r", "r", "r", "r", "r", "r"])) + "\n")
    (out / "scale.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
