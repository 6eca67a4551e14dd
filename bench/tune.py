"""Compute saved by the pretraining cache: one small grid swept twice, with and without the cache.

    python bench/tune.py [--epochs 4 8] [--budgets 10 20] [--max-concurrent 1] [--data DATASET]

The grid is pretraining epochs x pseudo-label budget (the shape of the method's grid) on the synthetic demo
set (3 classes x 60 + 60 unlabelled, 32 px) with a toy model, so that it runs on a 2-core CPU. Every
trial is a full ``run_pipeline`` (pretrain, fine-tune, one pseudo-label round, evaluate). With the cache,
trials that share the epochs share one pretraining; without it, each trial pretrains. Trials run one at a
time by default (--max-concurrent 1), so the sum of trial times is the compute; with more at a time a trial
waiting for another's pretraining counts its wait too. Prints a table and writes bench/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raysemi.core.config import load_config  # noqa: E402
from raysemi.core.tables import markdown_table  # noqa: E402
from raysemi.tune import pretrain_counts, run_tune  # noqa: E402

TOY = [
    "model.backbone=test_resnet", "model.small_image=false", "model.proj_hidden_dim=64", "model.proj_dim=32",
    "model.pred_hidden_dim=64", "data.image_size=32", "data.num_threads=1", "data.label_fraction=0.3",
    "pretrain.batch_size=32", "pretrain.warmup_epochs=0", "pretrain.knn_every=0", "finetune.batch_size=16",
    "finetune.epochs=2", "pseudolabel.rounds=1", "pseudolabel.num_actors=1", "pseudolabel.cpus_per_actor=0.5",
    "pseudolabel.batch_size=64", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
]


def sweep(cfg, space: str, out: Path, name: str, use_cache: bool, max_concurrent: int) -> dict:
    t0 = time.time()
    summary = run_tune(cfg, space, name=name, out=str(out), use_cache=use_cache, max_concurrent=max_concurrent)
    seconds = time.time() - t0
    done = [r for r in summary.rows if r["status"] == "completed"]
    if len(done) != len(summary.rows):
        raise SystemExit(f"{name}: {len(summary.rows) - len(done)} trials did not complete:\n{summary.text}")
    counts = pretrain_counts(summary.rows)
    return {
        "cache": use_cache,
        "trials": len(done),
        "sweep_s": round(seconds, 1),
        "trial_s_total": round(sum(r["wall_s"] for r in done), 1),
        "pretrain_s_total": round(sum(r["pretrain_s"] or 0.0 for r in done), 1),
        "pretrainings_computed": counts["computed"],
        "pretrainings_reused": counts["reused"],
        "best_val_accuracy": max(r["val_accuracy"] for r in done),
        "rows": [{k: r[k] for k in ("trial_id", "pretrain.epochs", "pseudolabel.budget", "wall_s", "pretrain_s",
                                    "pretrain_reused", "val_accuracy", "test_accuracy")} for r in done],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[4, 8], help="pretraining epochs (grid)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 20], help="pseudo-label budgets (grid)")
    ap.add_argument("--max-concurrent", type=int, default=1, help="trials at a time (default 1: compute only)")
    ap.add_argument("--data", help="a raysemi dataset (default: generate the synthetic demo set)")
    ap.add_argument("--address", help="Ray cluster to use (default: a private local Ray)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tune.json"))
    args = ap.parse_args()

    import ray

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from raysemi.data.synthetic import make_demo_dataset

            make_demo_dataset(str(work / "demo"), per_class=60, unlabeled=60, size=32, seed=0)
            data = str(work / "demo" / "dataset")
        space = work / "bench_grid.yaml"
        space.write_text(yaml.safe_dump({
            "description": "bench grid: pretraining epochs x pseudo-label budget",
            "params": {"pretrain.epochs": {"grid": args.epochs}, "pseudolabel.budget": {"grid": args.budgets}},
        }))
        cfg = load_config(None, [f"data.path={data}", *TOY])
        results = [sweep(cfg, str(space), work / "runs", name, cache, args.max_concurrent)
                   for name, cache in (("with_cache", True), ("without_cache", False))]
    with_c, without = results
    saved = without["trial_s_total"] - with_c["trial_s_total"]
    report = {
        "benchmark": "tune",
        "grid": {"pretrain.epochs": args.epochs, "pseudolabel.budget": args.budgets},
        "trials": with_c["trials"],
        "max_concurrent": args.max_concurrent,
        "dataset": "synthetic demo set, 3 classes x 60 + 60 unlabelled, 32 px" if args.data is None else args.data,
        "model": "timm test_resnet, 1 Ray Train worker x 0.5 CPU, 1 pseudo-label round",
        "with_cache": with_c,
        "without_cache": without,
        "trial_s_saved": round(saved, 1),
        "trial_s_saved_fraction": round(saved / without["trial_s_total"], 3),
        "pretrain_s_saved": round(without["pretrain_s_total"] - with_c["pretrain_s_total"], 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1min_at_end": round(os.getloadavg()[0], 2)},
        "note": "trial time = wall time of the whole pipeline in each trial, summed over trials; a pretraining "
                "costs its epochs plus Ray Train start-up, which dominates at this toy size",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(markdown_table(
        ["", "trials", "pretrain computed", "reused", "trial time s", "sweep s"],
        ([("with cache" if r["cache"] else "without cache"), r["trials"], r["pretrainings_computed"],
          r["pretrainings_reused"], f"{r['trial_s_total']:.1f}", f"{r['sweep_s']:.1f}"] for r in results),
        align="lrrrrr",
    )))
    print(f"saved by the cache: {saved:.1f} s of trial time ({100 * report['trial_s_saved_fraction']:.0f}%), "
          f"{report['pretrain_s_saved']:.1f} s of pretraining ({with_c['pretrain_s_total']:.1f} s instead of "
          f"{without['pretrain_s_total']:.1f} s)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
