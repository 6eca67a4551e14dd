"""Pseudo-label inference throughput: our actor pool vs one process vs Ray Data ``map_batches``.

Same shards, same model file, same decode (the eval transform of ``raysemi.data.loading.augment``, through the
loader on our side and the torch eval transform inside Ray Data's batch function), same batch size, and every
variant writes its predictions as Parquet. Timings exclude start-up (worker processes, imports, model
load, one warm-up forward pass), which is reported beside them:

- ``single process``: ``ShardPredictor`` in this process, torch using every core, no Ray.
- ``actor pool``: ``PredictorPool`` (what ``raysemi pseudolabel`` runs) with 1, 2, ... actors of 1 CPU.
- ``ray data``: ``read_parquet`` -> ``map_batches(callable class, concurrency=N, num_cpus=1)`` ->
  ``write_parquet``; its steady window starts when its last actor has loaded the model and warmed up.

A last section times the forward pass alone (``predictor.predict_batch`` on a random batch of the same size,
one process, every core): what the precision and layout change, without the decode that the end-to-end rows
include (at 64 px resnet18's forward is cheaper than decoding the image).

Every variant runs twice (``--computes``): as before this revision (``before``: fp32, contiguous) and as the
default now runs it (``auto``: bf16 autocast where the CPU has bf16 units, else fp32; channels_last), with the
ratio per method. The JSON records the CPU's model and its bf16 flags.

Ray starts with one logical CPU more than the machine has: Ray Data's file listing and read tasks need
a CPU slot of their own and would wait forever behind N actors holding all of them.

    .venv/bin/python bench/pseudolabel.py                 # generated 64 px greyscale PNGs
    .venv/bin/python bench/pseudolabel.py --dataset PATH  # train + unlabeled shards of a dataset
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, machine_info  # noqa: E402
from raysemi.core import io as rio  # noqa: E402
from raysemi.core.config import load_config  # noqa: E402
from raysemi.core.io import join  # noqa: E402
from raysemi.core.tables import markdown_table  # noqa: E402
from raysemi.data.shards import (  # noqa: E402
    SCHEMA,
    Manifest,
    SplitInfo,
    image_id,
    read_manifest,
    write_manifest,
    write_shard,
)
from raysemi.ml.compute import compute_for  # noqa: E402
from raysemi.models.checkpoint import build_classifier, save_classifier  # noqa: E402
from raysemi.stages import commits, predictor  # noqa: E402
from raysemi.stages import pseudolabel as pl  # noqa: E402

CLASSES = ["a", "b", "c"]
# The inference settings compared: as before this revision, and the default now.
COMPUTES = {
    "before": {"finetune.precision": "fp32", "finetune.channels_last": False},
    "auto": {"finetune.precision": "auto", "finetune.channels_last": True},
}


def generate(root: str, images: int, shards: int, size: int, seed: int = 0) -> list[str]:
    """Greyscale PNGs (noise + a bright disc, like a blob on a radiograph) in ``shards`` unlabeled shards."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    per = [images // shards + (1 if i < images % shards else 0) for i in range(shards)]
    info = SplitInfo()
    for k, n in enumerate(per):
        blobs = []
        for _ in range(n):
            im = Image.fromarray(rng.integers(0, 96, (size, size), dtype=np.uint8), "L")
            x, y = rng.integers(8, size - 8, 2).tolist()
            r = int(rng.integers(3, size // 4))
            ImageDraw.Draw(im).ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(128, 256)))
            buf = io.BytesIO()
            im.save(buf, "PNG")
            blobs.append(buf.getvalue())
        table = pa.table(
            {"id": [image_id(b) for b in blobs], "image": blobs, "label": pa.array([None] * n, pa.int16()),
             "group": pa.array([None] * n, pa.string()), "source": [f"bench/{k}/{i}.png" for i in range(n)]},
            schema=SCHEMA,
        )
        info.shards.append(write_shard(root, f"unlabeled/part-{k:05d}.parquet", table))
        info.rows += n
    write_manifest(root, Manifest(classes=CLASSES, splits={"unlabeled": info}, synthetic=True))
    return [join(root, s.path) for s in info.shards]


def dataset_shards(root: str) -> list[str]:
    manifest = read_manifest(root)
    return [u for split in ("train", "unlabeled") if split in manifest.splits for u in manifest.shard_uris(root, split)]


# ---------------------------------------------------------------- the forward pass alone


def forward_rows(model: str, base_cfg, batch: int, repeats: int, seconds: float = 5.0) -> list[dict]:
    """images/s of ``predict_batch`` alone per compute variant, interleaved repeats, medians."""
    import torch

    from raysemi.models.checkpoint import load_classifier

    runners = {}
    for name, sets in COMPUTES.items():
        cfg = base_cfg.replace(**sets)
        net, model_cfg, _ = load_classifier(model)
        compute = compute_for(torch.device("cpu"), cfg.finetune.precision, cfg.finetune.channels_last)
        compute.model(net).eval()
        x = torch.randn(batch, 3, model_cfg.data.image_size, model_cfg.data.image_size)
        predictor.predict_batch(net, x, compute)  # warm-up
        runners[name] = (net, x, compute)
    samples: dict[str, list[float]] = {n: [] for n in runners}
    for rep in range(repeats):
        for name in runners if rep % 2 == 0 else list(runners)[::-1]:
            net, x, compute = runners[name]
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                predictor.predict_batch(net, x, compute)
                n += 1
            samples[name].append(n * batch / (time.perf_counter() - t0))
            print(f"  [{rep}] {name:<6} forward only: {samples[name][-1]:8.1f} images/s", flush=True)
    base = float(np.median(samples["before"]))
    return [{"method": "forward pass only", "compute": name, "images_per_s_median": float(np.median(v)),
             "images_per_s_all": [round(x, 1) for x in v], "over_before": round(float(np.median(v)) / base, 2)}
            for name, v in samples.items()]


# ---------------------------------------------------------------- the three ways


def run_single(model: str, cfg, sha: str, uris: list[str], rows: list[int], out: str, threads: int) -> dict:
    t0 = time.perf_counter()
    shard_predictor = predictor.ShardPredictor(model, cfg, sha, num_threads=threads)
    shard_predictor.ready()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = sum(shard_predictor.run(i, u, out, r)[0] for i, (u, r) in enumerate(zip(uris, rows)))
    return {"rows": done, "seconds": time.perf_counter() - t0, "startup_s": startup}


def run_pool(model: str, cfg, sha: str, uris: list[str], rows: list[int], out: str, actors: int) -> dict:
    t0 = time.perf_counter()
    pool = pl.PredictorPool(model, sha, cfg, actors)
    try:
        pool.wait_ready()  # model loaded and one warm-up forward pass in every actor
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = pool.run([(i, u, r) for i, (u, r) in enumerate(zip(uris, rows))], out, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        pool.shutdown()
    commits.verify_exactly_once(out, uris, rows)
    return {"rows": done, "seconds": seconds, "startup_s": startup}


class RayDataPredictor:
    """Ray Data's callable class: the same model file, eval transform and forward pass as our actors.
    It logs ``start end rows`` per call, so the steady window can be measured from outside."""

    def __init__(self, model_uri: str, cfg, log_dir: str) -> None:
        import torch

        from raysemi.distributed import ray_utils
        from raysemi.models.checkpoint import load_classifier

        torch.set_num_threads(1)
        self.device = ray_utils.get_device()
        self.model, self.model_cfg, _ = load_classifier(model_uri, self.device)
        self.cfg = cfg
        self.compute = compute_for(self.device, cfg.finetune.precision, cfg.finetune.channels_last)
        self.compute.model(self.model)
        size = self.model_cfg.data.image_size
        predictor.predict_batch(self.model, torch.zeros(8, 3, size, size, device=self.device), self.compute)  # warm-up
        self.log = Path(log_dir, f"actor-{os.getpid()}")
        self.log.write_text(f"ready {time.time()!r}\n")

    def __call__(self, batch: dict) -> dict:
        import torch

        from raysemi.data.loading import augment as aug

        start = time.time()
        t = aug.eval_transform(self.model_cfg.data.image_size, self.model_cfg.augment)
        images = torch.stack([t(aug.decode_rgb(b)) for b in batch["image"]]).to(self.device)
        pred, conf, probs = predictor.predict_batch(self.model, images, self.compute)
        with self.log.open("a") as fh:
            fh.write(f"call {start!r} {time.time()!r} {len(batch['id'])}\n")
        return {"id": batch["id"], "pred": pred.numpy().astype(np.int16), "confidence": conf.numpy(),
                "probs": probs.numpy()}


def run_ray_data(model: str, cfg, uris: list[str], out: str, actors: int, batch_size: int, tmp: str) -> dict:
    """Steady window: from the moment the last actor is ready to the end of ``write_parquet``; the rows
    counted are those processed inside it (calls straddling its start counted pro rata)."""
    import pyarrow.parquet as pq
    import ray

    from raysemi.core.io import filesystem

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Small images make the whole set one 128 MiB block, which one actor would take alone: blocks of about
    # one shard's size give Ray Data the same unit of work as our pool.
    fs, _ = filesystem(uris[0])
    ctx.target_max_block_size = max(64 * 1024, sum(fs.size(filesystem(u)[1]) for u in uris) // len(uris))
    log_dir = tempfile.mkdtemp(dir=tmp, prefix="raydata-log-")
    t0_wall = time.time()
    ds = (
        ray.data.read_parquet(uris)
        .select_columns(["id", "image"])
        .map_batches(
            RayDataPredictor, fn_constructor_args=(model, cfg, log_dir),
            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, num_cpus=1,
        )
    )
    ds.write_parquet(out)
    end = time.time()
    ready, calls, per_actor = [], [], []
    for path in sorted(Path(log_dir).glob("actor-*")):
        per_actor.append(0)
        for line in path.read_text().splitlines():
            kind, *vals = line.split()
            if kind == "ready":
                ready.append(float(vals[0]))
            else:
                calls.append((float(vals[0]), float(vals[1]), int(vals[2])))
                per_actor[-1] += int(vals[2])
    start = max(ready)
    in_window = sum(n * (e - max(s, start)) / (e - s) if e > s else n for s, e, n in calls if e > start)
    done = pq.read_table(out, columns=["id"]).num_rows
    return {"rows": done, "seconds": end - start, "window_rows": in_window, "startup_s": start - t0_wall,
            "end_to_end_s": end - t0_wall, "rows_per_actor": per_actor}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", help="an existing dataset URI (its train + unlabeled shards)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--small-image", action="store_true", help="3x3 stem (4x16 more compute at 64 px)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", default="1,2", help="actor counts to try, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="passes over all variants (best and median kept)")
    ap.add_argument("--no-ray-data", action="store_true")
    ap.add_argument("--computes", default="before,auto", help="compute variants, comma-separated (before, auto)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pseudolabel.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    cores = os.cpu_count() or 1
    counts = [int(a) for a in args.actors.split(",")]
    load_before = os.getloadavg()
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="raysemi-bench-pl-") as tmp:
        uris = dataset_shards(args.dataset) if args.dataset else generate(f"{tmp}/data", args.images, args.shards, args.size)
        rows = [rio.parquet_rows(u) for u in uris]
        base_cfg = cfg = load_config(None, [
            f"model.backbone={args.backbone}", f"model.small_image={str(args.small_image).lower()}",
            "model.proj_hidden_dim=512", "model.proj_dim=128", f"data.image_size={args.size}", "data.loader=torch",
            f"pseudolabel.batch_size={args.batch_size}", "pseudolabel.cpus_per_actor=1",
        ])
        torch.manual_seed(0)
        model = f"{tmp}/classifier.safetensors"
        sha = save_classifier(model, build_classifier(cfg, len(CLASSES)), cfg, CLASSES)
        ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)

        trials: list[dict] = []

        def record(method: str, workers: int, rep: int, r: dict) -> None:
            assert r["rows"] == sum(rows), f"{method} predicted {r['rows']} of {sum(rows)} rows"
            r = {"method": method, "workers": workers, "compute": compute, "repeat": rep, **r,
                 "images_per_s": r.get("window_rows", r["rows"]) / r["seconds"], "load_average": os.getloadavg()[0]}
            r.setdefault("end_to_end_s", r["startup_s"] + r["seconds"])
            trials.append(r)
            print(f"  [{rep}] {compute:<6} {method:<15} x{workers}: {r['images_per_s']:8.1f} images/s  "
                  f"({r['seconds']:.1f} s, start-up {r['startup_s']:.1f} s, load {r['load_average']:.1f})", flush=True)

        print(f"{sum(rows)} images in {len(uris)} shards, {args.backbone} at {args.size} px, batch {args.batch_size}, "
              f"{cores} cores ({cpu_model()}), {args.repeats} repeat(s), variants interleaved", flush=True)
        for rep, compute in ((r, c) for r in range(args.repeats) for c in args.computes.split(",")):
            # interleaved, so that outside load hits every variant alike
            cfg = base_cfg.replace(**COMPUTES[compute])
            for threads in sorted({1, cores}):
                record("single process", threads, rep,
                       run_single(model, cfg, sha, uris, rows, f"{tmp}/single-{threads}-{compute}-{rep}", threads=threads))
            for n in counts:
                record("actor pool", n, rep, run_pool(model, cfg.replace(**{"pseudolabel.num_actors": n}), sha,
                                                      uris, rows, f"{tmp}/pool-{n}-{compute}-{rep}", n))
            if not args.no_ray_data:
                for n in counts:
                    record("ray data", n, rep, run_ray_data(model, cfg, uris, f"{tmp}/raydata-{n}-{compute}-{rep}", n,
                                                            args.batch_size, tmp))
        ray.shutdown()
        torch.set_num_threads(cores)
        forward = forward_rows(model, base_cfg, args.batch_size, args.repeats)

    results = []
    for key in dict.fromkeys((t["method"], t["workers"], t["compute"]) for t in trials):
        runs = [t for t in trials if (t["method"], t["workers"], t["compute"]) == key]
        ips = sorted(t["images_per_s"] for t in runs)
        results.append({
            "method": key[0], "workers": key[1], "compute": key[2], "images_per_s_best": ips[-1],
            "images_per_s_median": float(np.median(ips)),
            "startup_s_median": float(np.median([t["startup_s"] for t in runs])),
            "end_to_end_s_median": float(np.median([t["end_to_end_s"] for t in runs])),
        })
    print()
    before = {(r["method"], r["workers"]): r["images_per_s_median"] for r in results if r["compute"] == "before"}
    for r in results:
        base = before.get((r["method"], r["workers"]))
        r["over_before"] = round(r["images_per_s_median"] / base, 2) if base else None
    print("\n".join(markdown_table(
        ["method", "workers", "compute", "best img/s", "median img/s", "x before", "start-up s", "end-to-end s"],
        ([r["method"], r["workers"], r["compute"], f"{r['images_per_s_best']:.1f}", f"{r['images_per_s_median']:.1f}",
          "" if r["over_before"] is None else f"{r['over_before']:.2f}",
          f"{r['startup_s_median']:.1f}", f"{r['end_to_end_s_median']:.1f}"] for r in results),
        align="lrlrrrrr",
    )))
    report = {
        "benchmark": "pseudolabel inference",
        "images": sum(rows),
        "shards": len(uris),
        "dataset": args.dataset or f"generated {args.size}px greyscale PNG",
        "model": {"backbone": args.backbone, "small_image": args.small_image, "image_size": args.size,
                  "batch_size": args.batch_size},
        "machine": {
            **machine_info(), "cores": cores, "torch_threads_default": default_threads,
            "torch_threads_per_actor": 1, "torch_threads_single_process": cores,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
        },
        "workers": "actors (1 CPU, 1 torch thread each) for the pool and Ray Data; torch threads for the single process",
        "timing": "images/s over the steady window: start-up (workers, imports, model load, warm-up) excluded",
        "results": results,
        "forward_only": forward,
        "trials": trials,
    }
    print("\n".join(markdown_table(
        ["forward pass only", "compute", "median img/s", "x before"],
        (["predict_batch", r["compute"], f"{r['images_per_s_median']:.1f}", f"{r['over_before']:.2f}"] for r in forward),
        align="llrr")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
