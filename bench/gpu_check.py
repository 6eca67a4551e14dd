"""Ready for a GPU in one command (``make gpu-check``): raysemi's GPU paths run and measured, one JSON.

    python bench/gpu_check.py [--dry] [--only SECTION ...] [--out FILE]

(1) ``pytest -m gpu``; (2) DALI "mixed" (nvJPEG) decoding + the two BYOL views at 224 px, images/s; (3) the
BYOL step (``stages.pretrain.byol_step``) of resnet18 and resnet50 at 224 px, ``precision: auto`` (bf16 on the GPU)
and channels_last: images/s,
peak memory; (4) two Ray Train DDP workers on half a GPU each when it has the memory (on one GPU over gloo:
NCCL refuses two ranks on one device, "Duplicate GPU detected"; with 2+ GPUs, one each over NCCL); (5) a tiny
``raysemi run`` on generated demo data with ``ray.use_gpu=true``. Each section is ok, failed (the error's last
line) or skipped (why), with its seconds; any failure exits 1, and with CUDA a skipped gpu test is a failure.
``--dry`` (automatic without CUDA) runs the same code on the CPU at tiny sizes (32 px, resnet18 for the step,
timm's test_resnet elsewhere, DALI's CPU pipeline, gloo, no GPU; fp32 unless the CPU has bf16 units) so that
it cannot rot, into ``gpu_check-dry.json``. It attaches to a Ray already up in the process, else starts one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import pretrain as bp  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from raysemi.core.tables import markdown_table  # noqa: E402

RESULTS = REPO / "bench" / "results"
SECTIONS = ("gpu_tests", "dali_decode", "byol_step", "ddp", "end_to_end")
DDP_MIN_GIB = 16.0  # two resnet18 replicas at 224 px, batch 32 each, with room to spare
SIZES = {  # per mode: what each section runs
    "gpu": dict(decode_images=1024, decode_size=224, decode_batch=64, decode_epochs=2, step_models=["resnet18", "resnet50"],
                step_size=224, step_batch=64, warmup=3, steps=10, ddp_backbone="resnet18", ddp_size=224, ddp_batch=32,
                run_backbone="resnet18", run_size=64),
    "dry": dict(decode_images=64, decode_size=32, decode_batch=16, decode_epochs=1, step_models=["resnet18"],
                step_size=32, step_batch=8, warmup=1, steps=2, ddp_backbone="test_resnet", ddp_size=32, ddp_batch=8,
                run_backbone="test_resnet", run_size=32),
}


class CheckError(Exception):
    """A check that ran and found the GPU path broken."""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def byol_steps(backbone: str, dev: torch.device, batch: int, size: int, warmup: int, steps: int, seed: int = 0):
    """``stages.pretrain.byol_step`` (``precision: auto`` and channels_last) on one random batch, through
    the DDP-wrapped online network inside Ray Train: returns the model, seconds of the timed steps, last loss."""
    from raysemi.core.config import load_config
    from raysemi.ml.compute import compute_for
    from raysemi.ml.optim import build_optimizer
    from raysemi.stages import pretrain
    from raysemi.stages.common import wrap_ddp
    from raysemi.stages.worker import build_replica

    cfg = load_config(None, [f"model.backbone={backbone}", "model.small_image=false"])
    compute = compute_for(dev, cfg.pretrain.precision, cfg.pretrain.channels_last)
    model = compute.model(build_replica(lambda: pretrain.build_byol(cfg).train(), 0, False, dev))
    online = wrap_ddp(model.online, dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    opt = build_optimizer(cfg.pretrain.optimizer, model.online, 0.1, cfg.pretrain.weight_decay)
    scaler = compute.grad_scaler()
    torch.manual_seed(seed)
    x1, x2 = torch.randn(2, batch, 3, size, size, device=dev).unbind(0)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        loss = pretrain.byol_step(model, online, x1, x2, opt, scaler, 0.99, compute)
    _sync(dev)
    loss = float(loss)
    wall = time.perf_counter() - t0
    if not math.isfinite(loss):
        raise CheckError(f"{backbone}: BYOL loss {loss}")
    return model, wall, loss, compute


# ---------------------------------------------------------------- the sections


def gpu_tests(ctx: dict[str, Any]) -> dict[str, Any]:
    """``pytest -m gpu`` over the test files that hold gpu tests, in a subprocess; counts from its JUnit XML."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    xml = ctx["tmp"] / "gpu-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", *files], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0:
        raise CheckError(f"pytest -m gpu exited {proc.returncode}: {lines[-1] if lines else ''}")
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if ctx["cuda"] and counts["skipped"]:
        raise CheckError(f"{counts['skipped']} of {counts['tests']} gpu tests skipped although CUDA is available")
    return {"files": files, **counts, "pytest": lines[-1] if lines else "",
            "summary": f"{counts['tests']} tests, {counts['skipped']} skipped"}


def dali_decode(ctx: dict[str, Any]) -> dict[str, Any]:
    """The BYOL loader on DALI (bench/pretrain.py's), decoding on the GPU ("mixed") when there is one."""
    from raysemi.data.loading.dali import dali_available

    if not dali_available():
        raise CheckError("nvidia-dali is not installed: pip install -e '.[dali]'")
    s, dev = ctx["s"], ctx["device"]
    images, described = bp.load_images(bp.DEFAULT_SOURCE, s["decode_images"])
    uris, rows = bp.write_bench_shards(str(ctx["tmp"] / "decode"), images)
    threads = ctx["threads"]
    ld = bp.build_byol_loader(uris, rows, backend="dali", size=s["decode_size"], batch_size=s["decode_batch"],
                              threads=threads, device=dev if dev.type == "cuda" else None)
    t = bp.time_epochs(ld, 1, s["decode_epochs"])
    ld.set_epoch(99)
    v = deque(ld, maxlen=1)[0]["view1"]  # one more epoch, keeping its last batch
    if v.device.type != dev.type or tuple(v.shape[1:]) != (3, s["decode_size"], s["decode_size"]):
        raise CheckError(f"batch on {v.device} of shape {tuple(v.shape)}, expected {dev.type} and {s['decode_size']} px")
    return {"decoder": "mixed (nvJPEG)" if dev.type == "cuda" else "cpu", "data": described, "threads": threads,
            "size": s["decode_size"], "batch_size": s["decode_batch"], "images": t["images"],
            "images_per_s": round(t["images"] / t["wall"], 1),
            "summary": f"{'mixed' if dev.type == 'cuda' else 'cpu'}, {s['decode_size']} px: "
                       f"{t['images'] / t['wall']:.1f} images/s"}


def byol_step(ctx: dict[str, Any]) -> dict[str, Any]:
    """One BYOL step per backbone on random batches: images/s over the timed steps, peak memory."""
    s, dev, rows = ctx["s"], ctx["device"], []
    for backbone in s["step_models"]:
        model, wall, loss, compute = byol_steps(backbone, dev, s["step_batch"], s["step_size"], s["warmup"], s["steps"])
        rows.append({"backbone": backbone, "size": s["step_size"], "batch_size": s["step_batch"], "steps": s["steps"],
                     "precision": compute.precision, "channels_last": compute.channels_last, "images_per_s": round(s["steps"] * s["step_batch"] / wall, 1),
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if ctx["cuda"] else None,
                     "loss": round(loss, 4)})
        del model
        if ctx["cuda"]:
            torch.cuda.empty_cache()
    return {"rows": rows, "summary": "; ".join(
        f"{r['backbone']} {r['size']} px: {r['images_per_s']} images/s"
        + (f", {r['peak_memory_gib']} GiB" if r["peak_memory_gib"] is not None else "") for r in rows)}


def _ddp_worker(config: dict[str, Any]) -> None:
    """One Ray Train rank: BYOL steps through DDP (each rank its own batch), then every rank's weights
    checksum (equal when DDP averaged the gradients) and the slowest rank's time, reported by rank 0."""
    import torch.distributed as dist

    from raysemi.distributed import ray_utils

    dev, rank, world = ray_utils.get_device(), ray_utils.world_rank(), ray_utils.world_size()
    b, steps = config["batch"], config["steps"]
    model, wall, loss, _ = byol_steps(config["backbone"], dev, b, config["size"], 1, steps, seed=1 + rank)
    checksum = torch.stack([p.detach().double().sum() for p in model.online.parameters()]).sum()
    mine = torch.tensor([wall, float(checksum), torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda"
                         else 0.0], dtype=torch.float64, device=dev)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()
    metrics = {
        "world_size": world, "backend": dist.get_backend(), "device": str(dev), "loss": loss,
        "images_per_s": world * b * steps / float(every[:, 0].max()),
        "weights_spread": float(every[:, 1].max() - every[:, 1].min()), "checksum": float(every[0, 1]),
        "peak_memory_gib_per_rank": [round(float(x), 2) for x in every[:, 2]],
    }
    ray_utils.report(metrics, metrics if rank == 0 else None)  # rank 0's as a checkpoint: the driver reads it


def ddp(ctx: dict[str, Any]) -> dict[str, Any]:
    """Two Ray Train workers (TorchTrainer, DDP) sharing this machine's GPU(s), or two CPU workers on gloo."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysemi.core.config import load_config
    from raysemi.core.io import load_state
    from raysemi.distributed import ray_session, ray_utils

    s, cuda = ctx["s"], ctx["cuda"]
    gpus = torch.cuda.device_count() if cuda else 0
    backend = ctx["ddp_backend"] if ctx["ddp_backend"] != "auto" else ("nccl" if gpus >= 2 else "gloo")
    resources: dict[str, float] = {"CPU": 1.0 if cuda else 0.5}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        if gpus == 1 and total < DDP_MIN_GIB:
            return {"status": "skipped", "reason": f"one GPU of {total:.0f} GiB, under {DDP_MIN_GIB:.0f} GiB for two ranks"}
        resources["GPU"] = 1.0 if gpus >= 2 else 0.5
    ray_session.init_ray(None)
    if __name__ != "__main__":  # imported (the tests): the workers cannot import this file, so ship it by value
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _ddp_worker, train_loop_config={"backbone": s["ddp_backbone"], "batch": s["ddp_batch"], "size": s["ddp_size"],
                                        "steps": s["steps"]},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=cuda, resources_per_worker=resources),
        run_config=ray_utils.run_config("gpu-check-ddp", load_config(None, [f"run.output_dir={ctx['tmp'] / 'ddp'}",
                                                                            "ray.max_failures=0"])),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise CheckError("the DDP run finished without its report")
    with result.checkpoint.as_directory() as d:
        m = load_state(d)
    if m.get("world_size") != 2 or not math.isfinite(m.get("loss", math.nan)):
        raise CheckError(f"unexpected result: {m}")
    if m["weights_spread"] > 1e-6 * max(1.0, abs(m["checksum"])):
        raise CheckError(f"the two ranks' weights differ after DDP steps (spread {m['weights_spread']:.3g})")
    return {"backbone": s["ddp_backbone"], "size": s["ddp_size"], "batch_per_worker": s["ddp_batch"],
            "resources_per_worker": resources, **{k: m[k] for k in ("backend", "device", "weights_spread",
                                                                    "peak_memory_gib_per_rank")},
            "images_per_s": round(m["images_per_s"], 1),
            "summary": f"2 x {m['device']} ({m['backend']}): {m['images_per_s']:.1f} images/s"}


def end_to_end(ctx: dict[str, Any]) -> dict[str, Any]:
    """``raysemi run`` (the CLI's entry point, in this process) on generated demo data: report.json exists."""
    from raysemi.commands import cli
    from raysemi.data.synthetic import make_demo_dataset

    s, cuda, tmp = ctx["s"], ctx["cuda"], ctx["tmp"]
    make_demo_dataset(str(tmp / "demo"), per_class=60, unlabeled=60, size=s["run_size"], seed=0)
    overrides = [
        f"data.path={tmp / 'demo' / 'dataset'}", f"run.output_dir={tmp / 'run'}", f"ray.use_gpu={str(cuda).lower()}",
        f"model.backbone={s['run_backbone']}", "model.small_image=false", "model.proj_hidden_dim=64",
        "model.proj_dim=32", "model.pred_hidden_dim=64", f"data.image_size={s['run_size']}", "data.label_fraction=0.2",
        "pretrain.epochs=2", "pretrain.warmup_epochs=0", "pretrain.knn_every=0", "pretrain.batch_size=32",
        "finetune.batch_size=16", "finetune.steps=6", "finetune.eval_every=3", "finetune.warmup_steps=2",
        "pseudolabel.rounds=1", "pseudolabel.budget=0.25", "pseudolabel.num_actors=1", "pseudolabel.batch_size=64",
        "ray.num_workers=1", "ray.max_failures=0",
        *(["ray.cpus_per_worker=2", "pseudolabel.cpus_per_actor=1",
           "pseudolabel.gpus_per_actor=0.5"] if cuda else
          ["data.num_threads=1", "ray.cpus_per_worker=0.5", "pseudolabel.cpus_per_actor=0.5"]),
    ]
    rc = cli.main(["run", *[a for o in overrides for a in ("--set", o)]])
    path = tmp / "run" / "report.json"
    if rc != 0 or not path.is_file():
        raise CheckError(f"raysemi run exited {rc}; report.json {'written' if path.is_file() else 'missing'}")
    report = json.loads(path.read_text())
    return {"backbone": s["run_backbone"], "size": s["run_size"], "use_gpu": cuda, "rounds": len(report["rounds"]),
            "test_accuracy": round(report["test"]["accuracy"], 3), "stage_seconds": report.get("stages"),
            "summary": f"report.json: {len(report['rounds'])} rounds, test accuracy {report['test']['accuracy']:.3f}"}


# ---------------------------------------------------------------- running and reporting


def run_section(name: str, fn, ctx: dict[str, Any]) -> dict[str, Any]:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        entry = {"status": "ok", **fn(ctx)}
    except Exception as err:  # every failure is recorded, and the run goes on to the next section
        traceback.print_exc()
        entry = {"status": "failed", "error": traceback.format_exception_only(type(err), err)[-1].strip()}
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"== {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
    return entry


def machine() -> dict[str, Any]:
    import ray

    info = machine_info()
    info.update(torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), ray=ray.__version__,
                gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes (automatic without CUDA)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--ddp-backend", choices=["auto", "nccl", "gloo"], default="auto",
                    help="auto: nccl with one GPU per rank (2+ GPUs), else gloo")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI CPU threads")
    ap.add_argument("--out", help="JSON (default bench/results/gpu_check.json, gpu_check-dry.json in dry mode)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    mode = "gpu" if cuda else ("dry (--dry)" if torch.cuda.is_available() else "dry (no CUDA)")
    out = Path(args.out or RESULTS / ("gpu_check.json" if cuda else "gpu_check-dry.json"))
    import ray

    attached = ray.is_initialized()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysemi-gpu-check-") as tmp:
        ctx = {"cuda": cuda, "device": torch.device("cuda", 0) if cuda else torch.device("cpu"), "tmp": Path(tmp),
               "s": SIZES["gpu" if cuda else "dry"], "threads": args.threads, "ddp_backend": args.ddp_backend}
        fns = dict(zip(SECTIONS, (gpu_tests, dali_decode, byol_step, ddp, end_to_end)))
        sections = {n: run_section(n, fns[n], ctx) for n in SECTIONS if not args.only or n in args.only}
        if not attached and ray.is_initialized():
            ray.shutdown()
    failed = [n for n, e in sections.items() if e["status"] == "failed"]
    result = {"check": "gpu_check", "mode": mode, "ok": not failed, "failed": failed,
              "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "sizes": ctx["s"], "sections": sections}
    print(f"\ngpu check, mode {mode}, {result['seconds']} s, on {result['machine']['gpu'] or 'CPU'}\n")
    print("\n".join(markdown_table(["section", "status", "seconds", "figures (or why not)"], (
        [n, e["status"], f"{e['seconds']:.1f}", e.get("summary") or e.get("error") or e.get("reason", "")]
        for n, e in sections.items()))))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
