"""Scale of a pseudo-label round's driver-side steps: wall time, driver memory, bytes read, S3 requests.

What a round does in the driver today (``raysemi.pipeline.run_pipeline``), step by step, on synthetic
datasets of N rows written by the project's own shard writer (1 KB stand-in images, 1,000 rows per shard, the
``train`` split half labelled, ``data.label_fraction`` 0.1) and prediction shards written through the commit
protocol (``stages.commits.commit``) as the actors would:

- ``label choice``: ``data.labels.label_split`` (which labels a run may use; the pool);
- ``read predictions``: ``stages.commits.read_predictions`` of every committed prediction shard;
- ``selection``: the pool as a set, ``stages.selection.select_pseudo_labels`` (budget 0.25 of the pool, prior);
- ``soft targets``: the chosen rows' sharpened probabilities (``pipeline.soft_targets``);
- ``exactly-once check``: ``stages.commits.verify_exactly_once``;
- ``training-set build``: ``data.trainset.write_trainset`` of the labelled + chosen rows.

Each step runs in a fresh process (so one step's memory does not count against the next) that first imports
everything and builds its inputs, then runs the step alone while a thread samples its resident memory every
10 ms. Per step: wall seconds, the peak RSS above the RSS just before the step, the bytes the process read
during it (``rchar`` of ``/proc/self/io`` on local disk; on S3 the bytes received on the loopback interface,
where the S3 server is the only other party while the step runs), and with
``--s3`` the requests the moto S3 server on loopback received during it, per input shard (its request log).
No model, no decoding: ingest and ``predict`` at these sizes are not measured here.

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
STEPS = ("label choice", "read predictions", "selection", "soft targets", "exactly-once check",
         "training-set build")
LABEL_FRACTION = 0.1
BUDGET = 0.25


# ---------------------------------------------------------------- data


def generate(root: str, rows: int, seed: int = 0) -> None:
    """A dataset of ``rows`` train rows (half labelled) in shards of ``ROWS_PER_SHARD``, a one-shard val and
    test split, and one committed prediction shard per train shard under ``<root>/predictions``."""
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
                commits.commit(pred_root, index, f"{root}/{shard.path}", pred, "0" * 64, shard.sha256)
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


def _loopback_received() -> int:
    """Bytes received on the loopback interface (all processes; the step's process is the only one talking
    to the S3 server while it runs): what an S3 step read, requests included."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def _requests(log: str | None) -> int:
    if not log:
        return 0
    with open(log, "rb") as fh:
        return sum(1 for line in fh if b'HTTP/1.1"' in line)


def run_step(step: str, root: str, work: str, moto_log: str | None) -> dict[str, Any]:
    """Build the step's inputs (not measured), then run the step alone (measured)."""
    import numpy as np

    from raysemi.config import DataConfig
    from raysemi.data.labels import label_split
    from raysemi.data.shards import read_manifest
    from raysemi.data.trainset import write_trainset
    from raysemi.pipeline import soft_targets
    from raysemi.stages.commits import read_predictions, verify_exactly_once
    from raysemi.stages.selection import budget_count, select_pseudo_labels, selection_prior

    manifest = read_manifest(root)
    pred_uri = f"{root}/predictions"
    data = DataConfig(path=root, label_fraction=LABEL_FRACTION)
    uris = manifest.shard_uris(root, "train")
    state: dict[str, Any] = {}

    def prepare(upto: str) -> None:
        order = STEPS.index(upto)
        if order > 0:
            state["labels"] = label_split(root, data)
        if order > 1:
            state["predictions"] = read_predictions(pred_uri)
        if order > 2:
            labels = state["labels"]
            prior = selection_prior("prior", labels.labeled_targets, len(CLASSES))
            state["chosen"] = select_pseudo_labels(state["predictions"], set(labels.pool_ids),
                                                   budget_count(BUDGET, len(labels.pool_ids)), len(CLASSES),
                                                   prior=prior)

    def act() -> Any:
        if step == "label choice":
            return label_split(root, data)
        if step == "read predictions":
            return read_predictions(pred_uri)
        labels = state["labels"]
        if step == "selection":
            prior = selection_prior("prior", labels.labeled_targets, len(CLASSES))
            return select_pseudo_labels(state["predictions"], set(labels.pool_ids),
                                        budget_count(BUDGET, len(labels.pool_ids)), len(CLASSES), prior=prior)
        chosen = state["chosen"]
        ids = chosen.column("id").to_pylist()
        if step == "soft targets":
            by_id = dict(zip(state["predictions"].column("id").to_pylist(),
                             state["predictions"].column("probs").to_pylist()))
            return soft_targets([by_id[i] for i in ids], 0.5)
        if step == "exactly-once check":
            return verify_exactly_once(pred_uri, uris, [s.rows for s in manifest.splits["train"].shards])
        rows = {i: (int(y), 1.0) for i, y in zip(labels.labeled_ids, labels.labeled_targets)}
        preds = np.asarray(chosen.column("pred").to_pylist(), dtype=np.int64)
        rows.update({i: (int(p), 1.0) for i, p in zip(ids, preds)})
        return write_trainset(root, manifest, rows, f"{work}/trainset", num_shards=4)

    prepare(step)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    read = _loopback_received if moto_log else _rchar  # S3 reads come over sockets, which rchar misses
    base_rss, base_read, base_req = _rss(), read(), _requests(moto_log)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    act()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"step": step, "seconds": wall, "peak_rss_over_start_mib": max(0, max(peak[0], _rss()) - base_rss) / 2**20,
            "bytes_read_mib": (read() - base_read) / 2**20, "s3_requests": _requests(moto_log) - base_req,
            "input_shards": len(uris)}


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
        print(f"  {step:<20} {out[-1]['seconds']:8.2f} s  +{out[-1]['peak_rss_over_start_mib']:7.0f} MiB  "
              f"read {out[-1]['bytes_read_mib']:8.0f} MiB  S3 requests {out[-1]['s3_requests']}", flush=True)
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
                    subprocess.run([sys.executable, "-c", (
                        "import s3fs, sys; fs = s3fs.S3FileSystem(); fs.mkdir('scale'); "
                        "fs.put(sys.argv[1], 'scale/ds', recursive=True)"), root], env=s3env, check=True)
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
    header = ["rows", "storage", "step", "seconds", "peak RSS over start (MiB)", "bytes read (MiB)",
              "S3 requests / shard"]
    body = []
    for run in results["runs"]:
        for s in run["steps"]:
            per_shard = f"{s['s3_requests'] / s['input_shards']:.1f}" if run["storage"] == "s3" else ""
            body.append([f"{run['rows']:,}", run["storage"], s["step"], f"{s['seconds']:.2f}",
                         f"{s['peak_rss_over_start_mib']:.0f}", f"{s['bytes_read_mib']:.0f}", per_shard])
    m = results["machine"]
    text = (f"# A round's driver-side steps at scale (`bench/scale.py`, revision {results['revision']})\n\n"
            f"{m.get('cpu_model', '?')}, {m['cpus']} cores, bf16 flags: {', '.join(m['bf16_flags']) or 'none'}; "
            f"{results['rows_per_shard']:,} rows per shard, {results['image_bytes']} B images, "
            f"label fraction {results['label_fraction']}, budget {results['budget']} of the pool.\n\n"
            + "\n".join(markdown_table(header, body, ["r", "l", "l", "r", "r", "r", "r"])) + "\n")
    (out / "scale.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
