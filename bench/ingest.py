"""Ingest throughput on the COVID-19 chest X-ray folder: local disk and S3 (a moto server on loopback).

    python bench/ingest.py [--source DIR] [--repeat 3]

Prints a table (images/s per target; the median of --repeat runs) and writes bench/results/ingest.json.
The S3 figure is against moto's in-process Python server on this machine, so it measures the client
path (s3fs, multipart, copy-on-rename) plus moto, not a real S3 endpoint's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raysemi.data import shards  # noqa: E402
from raysemi.data.ingest import ingest  # noqa: E402
from raysemi.data.validate import check_image  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "covid19-radiography-3class"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit("moto server did not start")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return proc, endpoint


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    args = ap.parse_args()
    source = Path(args.source)
    if not source.is_dir():
        raise SystemExit(f"source folder {source} does not exist")
    files = [f for f in source.glob("*/*") if f.is_file()]
    mbytes = sum(f.stat().st_size for f in files) / 1e6

    def decode_only():
        for f in files:
            check_image(f.read_bytes())

    proc, endpoint = start_moto()
    import s3fs

    tmp = Path(tempfile.mkdtemp(prefix="raysemi-bench-"))
    bucket = f"raysemi-bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    targets = {
        "decode+validate only (1 thread)": decode_only,
        "ingest -> local disk": lambda: ingest(str(source), str(tmp / "ds"), overwrite=True, progress=False),
        "ingest -> s3:// (moto, loopback)": lambda: ingest(
            str(source), f"s3://{bucket}/covid", overwrite=True, progress=False
        ),
    }
    rows = []
    try:
        decode_only()  # warm the page cache: every target reads the same files
        for name, fn in targets.items():
            secs = [timed(fn) for _ in range(args.repeat)]
            med = statistics.median(secs)
            rows.append(
                {
                    "target": name,
                    "images": len(files),
                    "seconds_median": round(med, 3),
                    "seconds_all": [round(s, 3) for s in secs],
                    "images_per_s": round(len(files) / med, 1),
                    "mb_per_s": round(mbytes / med, 2),
                }
            )
        manifest = shards.read_manifest(str(tmp / "ds"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        proc.terminate()
        proc.wait(timeout=10)

    print(f"\ningest of {source.name}: {len(files)} images, {mbytes:.1f} MB, {os.cpu_count()} CPUs\n")
    print(f"| {'target':<34} | {'images/s':>9} | {'MB/s':>6} | {'median s':>8} |")
    print(f"| {'-' * 34} | {'-' * 9} | {'-' * 6} | {'-' * 8} |")
    for r in rows:
        print(
            f"| {r['target']:<34} | {r['images_per_s']:>9.1f} | {r['mb_per_s']:>6.2f} | {r['seconds_median']:>8.2f} |"
        )
    stored = sum(s.rows for s in manifest.splits.values())
    print(f"\nstored {stored}, quarantined {len(manifest.quarantine)}, duplicates {manifest.duplicates}")
    result = {
        "benchmark": "ingest",
        "source": str(source),
        "images": len(files),
        "megabytes": round(mbytes, 2),
        "repeat": args.repeat,
        "stored": stored,
        "quarantined": len(manifest.quarantine),
        "duplicates": manifest.duplicates,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "note": "s3 target is a moto server on loopback, not AWS",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
