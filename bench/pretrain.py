"""Pretraining throughput, side by side in one run: the BYOL loader (DALI pipeline, torchvision DataLoader,
the DataLoader with its decoded-image cache) and the training steps (fp32 against ``precision: auto``,
contiguous against channels_last, eager against ``torch.compile``).

    python bench/pretrain.py [--source DIR] [--images 1024] [--threads N] [--sizes 224 64] [--repeat 3]
                             [--config configs/cpu.yaml] [--step-seconds 6]

Both loaders run the same two-view BYOL recipe (``raysemi.data.loading.augment`` / ``raysemi.data.loading.dali``) over the
same Parquet shards, in one process on the same machine, with the same number of threads: DALI's
``num_threads`` CPU threads vs the DataLoader's ``num_workers`` processes (each also has the main Python
thread: DALI's feeds the pipeline, the DataLoader's reads shards and unpickles batches). The shards hold the
first ``--images`` of the COVID-19 chest X-ray folder (224x224 greyscale JPEG) when it is present, else as
many generated 224x224 greyscale JPEGs. Each loader runs one epoch first, excluded (warm-up: pipeline
build, first decode, page cache); then every loader is timed for ``--epochs`` epochs, ``--repeat`` times,
interleaved with alternating order; the table shows medians. An "image" is one row, i.e. two views. The
DataLoader starts its workers each epoch (the loader does not keep them), which is part of its cost.
``torch+cache`` is timed after its warm-up epoch has filled the cache: every later epoch of a run.

Columns: images/s (wall clock; median and best of the repeats), per thread (median images/s divided by
the configured threads), images/CPU-s and CPU ms/image (process + worker CPU time from getrusage: what an
image really costs, and the figure least disturbed by other load on a shared machine), cores busy (CPU time
/ wall time; below the thread count when the loader waits or the machine is busy elsewhere). Prints a table
and writes bench/results/pretrain.json.

Step rows: the backbone, image size and batch sizes of ``--config`` (the CPU recipe by default) on random
batches, one process, ``--threads`` torch threads: the BYOL step (raysemi's ``byol_step`` and a plain PyTorch
loop, the reference of its overhead) and the fine-tuning step, each as before this revision (fp32, contiguous,
eager), as the default now runs it (``auto``: bf16 where the CPU has bf16 units, else fp32; channels_last),
compiled, and in explicit bf16 (emulated, about 10x slower, on a CPU without bf16 units). "compile s" is the
compiled first step's extra time; "pays after" the stage length from which compiling saves time. The JSON
records the CPU's model and its bf16 flags.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from bench.train_steps import step_overhead, step_rows, step_table  # noqa: E402
from raysemi.core import io as rio  # noqa: E402
from raysemi.core.config import AugmentConfig  # noqa: E402
from raysemi.core.tables import markdown_table  # noqa: E402
from raysemi.data import shards  # noqa: E402
from raysemi.data.loading.dali import dali_available  # noqa: E402
from raysemi.data.loading.loader import build_loader  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "covid19-radiography-3class"
DEFAULT_OUT = REPO / "bench" / "results" / "pretrain.json"


# ---------------------------------------------------------------- data


def _synthetic_jpeg(rng: np.random.Generator, size: int = 224) -> bytes:
    a = (rng.random((size // 8, size // 8)) * 255).astype(np.uint8)
    im = Image.fromarray(a).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def load_images(source: Path | None, n: int) -> tuple[list[bytes], str]:
    """``n`` encoded images: the first ``n`` files of ``source`` (sorted) when it exists, else generated."""
    if source is not None and source.is_dir():
        files = sorted(f for f in source.glob("*/*") if f.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if files:
            picked = [files[i % len(files)] for i in range(n)]
            return [f.read_bytes() for f in picked], f"{source.name}: first {n} of {len(files)} files"
    rng = np.random.default_rng(0)
    return [_synthetic_jpeg(rng) for _ in range(n)], f"generated: {n} greyscale 224x224 JPEG q95"


def write_bench_shards(root: str, images: list[bytes], num_shards: int = 4) -> tuple[list[str], list[int]]:
    uris, rows = [], []
    for s in range(num_shards):
        part = images[s::num_shards]
        ids = [shards.image_id(b) + f"-{s}-{i}" for i, b in enumerate(part)]
        table = pa.table(
            {"id": ids, "image": part, "label": pa.array([None] * len(part), pa.int16()),
             "group": [None] * len(part), "source": ids}
        )
        info = shards.write_shard(root, f"train/part-{s:05d}.parquet", table)
        uris.append(rio.join(root, info.path))
        rows.append(info.rows)
    return uris, rows


# ---------------------------------------------------------------- measurements


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # DataLoader workers, once joined (epoch end)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


CACHED = "torch+cache"  # the torch backend with its decoded-image cache (data.decode_cache_mb)


def build_byol_loader(uris: list[str], rows: list[int], *, backend: str, size: int, batch_size: int, threads: int,
                      device: torch.device | None = None):
    """A BYOL-mode loader, warmed up by one full epoch (pipeline build, first decode, page cache; for
    ``torch+cache`` the epoch that fills the cache). With a CUDA ``device`` DALI decodes there ("mixed";
    bench/gpu_check.py)."""
    ld = build_loader(
        uris, mode="byol", size=size, batch_size=batch_size, augment=AugmentConfig(),
        backend="torch" if backend == CACHED else backend, num_threads=threads, shard_rows=rows, seed=0,
        device=device, decode_cache_mb=4096 if backend == CACHED else 0,
    )
    ld.set_epoch(0)
    for _ in ld:
        pass
    return ld


def time_epochs(ld, first_epoch: int, epochs: int) -> dict[str, float]:
    """Wall and CPU seconds (this process + joined workers) for ``epochs`` full epochs."""
    images = 0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for epoch in range(first_epoch, first_epoch + epochs):
        ld.set_epoch(epoch)
        for batch in ld:
            images += batch["view1"].shape[0]
    return {"images": images, "wall": time.perf_counter() - t0, "cpu": _cpu_seconds() - cpu0}


def loader_row(backend: str, size: int, batch_size: int, threads: int, samples: list[dict[str, float]]):
    """One table row from repeated measurements: medians over the repeats."""
    ips = statistics.median(s["images"] / s["wall"] for s in samples)
    best = max(s["images"] / s["wall"] for s in samples)
    cpu_ms = statistics.median(1000 * s["cpu"] / s["images"] for s in samples)
    busy = statistics.median(s["cpu"] / s["wall"] for s in samples)
    return {
        "what": "loader, byol two views",
        "backend": backend,
        "size": size,
        "batch_size": batch_size,
        "threads": threads,
        "images_per_repeat": int(samples[0]["images"]),
        "repeats": len(samples),
        "images_per_s": round(ips, 1),  # median over repeats
        "images_per_s_best": round(best, 1),  # the least disturbed repeat
        "images_per_s_all": [round(s["images"] / s["wall"], 1) for s in samples],
        "images_per_s_per_thread": round(ips / threads, 1),
        "cpu_ms_per_image": round(cpu_ms, 2),
        "images_per_cpu_s": round(1000 / cpu_ms, 1),  # images/s per core actually used
        "cores_busy": round(busy, 2),
    }


def loader_rows(args: argparse.Namespace, data: dict[str, Any]) -> list[dict[str, Any]]:
    """DALI vs torchvision BYOL loaders: every (size, backend) warmed up, then timed in interleaved repeats
    (the order alternates), so that load from elsewhere on the machine hits both alike."""
    backends = (["dali"] if dali_available() else []) + ["torch", CACHED]
    configs = [(size, backend) for size in args.sizes for backend in backends]
    loaders = {
        (size, backend): build_byol_loader(
            data["uris"], data["rows"], backend=backend, size=size, batch_size=args.batch_size, threads=args.threads
        )
        for size, backend in configs
    }
    samples: dict[tuple[int, str], list[dict[str, float]]] = {c: [] for c in configs}
    for rep in range(args.repeat):
        for c in configs if rep % 2 == 0 else configs[::-1]:
            s = time_epochs(loaders[c], 1 + rep * args.epochs, args.epochs)
            samples[c].append(s)
            print(f"  repeat {rep + 1}: {c[1]:>5} {c[0]:>4}px {s['images'] / s['wall']:8.1f} images/s", flush=True)
    return [loader_row(b, size, args.batch_size, args.threads, samples[(size, b)]) for size, b in configs]


# Each builder returns table rows; training-step rows join this list later.
ROW_BUILDERS: list[Callable[[argparse.Namespace, dict[str, Any]], list[dict[str, Any]]]] = [loader_rows]


# ---------------------------------------------------------------- report


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """DALI over torchvision, per image size (loader rows): by median and best wall-clock images/s, and by
    images per CPU-second (the figure that other load on the machine disturbs least)."""
    by = {(r["backend"], r["size"]): r for r in rows if r.get("what", "").startswith("loader")}
    out: dict[str, dict[str, float]] = {}
    for key in ("images_per_s", "images_per_s_best", "images_per_cpu_s"):
        out[key] = {
            f"{size}px": round(r[key] / by[("torch", size)][key], 2)
            for (backend, size), r in by.items()
            if backend == "dali" and ("torch", size) in by
        }
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["what", "backend", "size", "threads", "images/s median", "best", "per thread", "images/CPU-s",
            "CPU ms/image", "cores busy"]
    body = []
    for r in rows:
        cells = [
            r["what"], r["backend"], f"{r['size']}px", str(r["threads"]), f"{r['images_per_s']:.1f}",
            f"{r['images_per_s_best']:.1f}", f"{r['images_per_s_per_thread']:.1f}", f"{r['images_per_cpu_s']:.1f}",
            f"{r['cpu_ms_per_image']:.2f}", f"{r['cores_busy']:.2f}",
        ]
        body.append(cells)
    return "\n".join(markdown_table(head, body))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="image folder (class subfolders)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat (after one warm-up epoch)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the table shows medians")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"),
                    help="the step rows' backbone, image size and batch sizes")
    ap.add_argument("--step-seconds", type=float, default=6.0, help="timed seconds per step variant and repeat")
    ap.add_argument("--steps-only", action="store_true",
                    help="measure only the training-step rows and update them in the existing JSON")
    args = ap.parse_args(argv)
    if args.steps_only:
        steps = step_rows(args)
        overhead = step_overhead(steps)
        print(step_table(steps))
        print(f"raysemi / plain loop: {overhead:.3f} (target >= 0.95)")
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "pretrain"}
        result.update(step_rows=steps, raysemi_step_over_plain_loop=round(overhead, 3), machine=machine_info())
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"updated {out}")
        return

    images, described = load_images(Path(args.source) if args.source else None, args.images)
    tmp = tempfile.mkdtemp(prefix="raysemi-bench-")
    try:
        uris, rows = write_bench_shards(tmp, images)
        data = {"uris": uris, "rows": rows, "described": described}
        machine = machine_info()
        print(f"pretrain bench on {machine['cpus']} CPUs ({machine['cpu_model']}), data: {described}")
        table_rows: list[dict[str, Any]] = []
        load_before = os.getloadavg()
        for build in ROW_BUILDERS:
            table_rows += build(args, data)
        # Other work on the machine skews wall-clock figures (CPU ms/image much less): keep a record of it.
        machine["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    steps = step_rows(args)
    summary = ratios(table_rows)
    print()
    print(format_table(table_rows))
    overhead = step_overhead(steps)
    print()
    print(step_table(steps))
    print(f"raysemi / plain loop: {overhead:.3f} (target >= 0.95)")
    print("\nDALI / torchvision, same threads, same machine:")
    for key, by_size in summary.items():
        print(f"  {key:<18} {by_size}")
    result = {
        "benchmark": "pretrain",
        "machine": machine,
        "data": described,
        "images": args.images,
        "epochs_per_repeat": args.epochs,
        "repeat": args.repeat,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rows": table_rows,
        "dali_over_torch": summary,
        "step_rows": steps,
        "raysemi_step_over_plain_loop": round(overhead, 3),
        "note": "images = rows (each gives two views); one warm-up epoch excluded; medians of interleaved "
        "repeats; per thread = images/s / threads; CPU ms/image from getrusage (process + joined workers); "
        "DALI runs its CPU pipeline where no GPU is present",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
