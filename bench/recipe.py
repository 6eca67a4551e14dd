"""Choose the CPU recipe by measurement: for each candidate backbone and image size, what one full run costs on this
machine and how high supervised training on every label goes (the recipe's capacity: the ceiling the few-label
rows are measured against).

    python bench/recipe.py DATASET [--config configs/cpu.yaml] [--candidates test_resnet@64 resnet10t@96 ...]
                           [--steps 1200 2400] [--seeds 0] [--budget-min 30] [--skip-accuracy]

Per candidate (``backbone@size``):

- BYOL and fine-tuning training images/s (the stages' own step functions, the precision ``auto`` resolves to here,
  channels_last, random batches: no data wait, which ``bench/pretrain.py`` shows to be small), interleaved repeats,
  on as many torch threads as a Ray Train worker of the config takes on this machine (``ray.torch_threads``, or
  the machine's CPUs shared among ``ray.num_workers``: ``stages/worker.use_threads``), unless ``--threads``;
- the projected wall time of one full run of the config (``run.mode=full``) on ``DATASET``: BYOL epochs x the
  train + unlabelled images, fine-tuning ``(rounds + 1) x steps x batch`` images, pseudo-labelling the pool
  each round (inference, about a third of a training step per image), and the BYOL epochs that fit in
  ``--budget-min`` minutes beside the rest;
- supervised training on 100% of the train labels for each ``--steps`` (``raysemi run --set run.mode=supervised``,
  the same runs as ``bench/quality.py``'s ceiling row, reused from its folders), validation and test accuracy.

Prints a table and writes ``bench/results/recipe.json`` (with the CPU and its flags).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info
from quality import _reusable, run_one, rung_sets
from train_steps import _byol_runner, _finetune_runner, _time

from raysemi.core.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
INFERENCE_COST = 1 / 3  # a forward pass at batch 256 against a training step's forward + backward (bench/pseudolabel.py)


def parse_candidate(text: str) -> tuple[str, int]:
    """``backbone@size`` -> (backbone, size); anything else is refused in one line."""
    name, _, size = text.partition("@")
    if not name or not size.isdigit() or int(size) < 16:
        raise SystemExit(f"bench/recipe.py: error: --candidates {text!r}: use BACKBONE@SIZE, e.g. resnet10t@96")
    return name, int(size)


def dataset_rows(path: str) -> dict[str, int]:
    """Rows per split of an ingested data set (from its manifest: no image is read)."""
    from raysemi.data.shards import read_manifest

    manifest = read_manifest(path)
    return {name: sum(s.rows for s in split.shards) for name, split in manifest.splits.items()}


def step_speeds(cfg, repeat: int, seconds: float) -> dict[str, float]:
    """Median training images/s of the BYOL and fine-tuning steps of ``cfg`` (precision auto, channels_last)."""
    from raysemi.ml.compute import compute_for

    runners = {}
    for what, build, precision, batch in (("byol", _byol_runner, cfg.pretrain.precision, cfg.pretrain.batch_size),
                                          ("finetune", _finetune_runner, cfg.finetune.precision,
                                           cfg.finetune.batch_size)):
        compute = compute_for(torch.device("cpu"), precision, True)
        step = build(cfg, compute, False, batch, cfg.data.image_size)
        step()
        step()
        runners[what] = (step, batch)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for what, (step, batch) in runners.items():
            rate, _ = _time(step, seconds)
            samples[what].append(rate * batch)
    return {k: round(statistics.median(v), 1) for k, v in samples.items()}


def worker_threads(cfg) -> int:
    """The torch threads a Train worker of ``cfg`` takes when all its workers run on this machine."""
    from raysemi.distributed.ray_utils import node_cpus

    return cfg.ray.torch_threads or max(1, node_cpus() // cfg.ray.num_workers)


def project(cfg, rows: dict[str, int], speeds: dict[str, float], budget_s: float) -> dict[str, float]:
    """Projected seconds of a full run's stages and the BYOL epochs that fit in ``budget_s`` beside the rest."""
    pool_all = rows.get("train", 0) + rows.get("unlabeled", 0)
    labelled = rows.get("train", 0) * (cfg.data.label_fraction or 1.0)
    pool = pool_all - labelled
    byol_epoch = pool_all / speeds["byol"]
    finetune = (cfg.pseudolabel.rounds + 1) * cfg.finetune.steps * cfg.finetune.batch_size / speeds["finetune"]
    label = cfg.pseudolabel.rounds * pool * INFERENCE_COST / speeds["finetune"]
    rest = finetune + label
    return {"byol_epoch_s": round(byol_epoch, 1), "pretrain_s": round(cfg.pretrain.epochs * byol_epoch, 0),
            "finetune_s": round(finetune, 0), "pseudolabel_s": round(label, 0),
            "full_run_s": round(cfg.pretrain.epochs * byol_epoch + rest, 0),
            "byol_epochs_in_budget": max(0, int((budget_s - rest) // byol_epoch))}


def supervised_all(config: str, dataset: str, sets: list[str], steps: int, seed: int, out: Path,
                   reuse_only: bool = False) -> dict[str, Any] | None:
    """Supervised on 100% of the train labels at ``steps`` fine-tuning steps: val / test accuracy, wall seconds
    (None with ``reuse_only`` when that run has not been made)."""
    _, all_sets = rung_sets("100%")
    run = [f"data.path={dataset}", f"data.label_seed={seed}", f"finetune.seed={seed}", "run.mode=supervised",
           *all_sets, *sets, f"finetune.steps={steps}"]
    folder = out / f"supervised_all-seed{seed}-steps{steps}"
    if reuse_only and not _reusable(folder, config, [*run, f"run.output_dir={folder}",
                                                     f"run.name=quality-{folder.name}"]):
        return None
    report, wall, reused = run_one(config, run, folder)
    val = report["rounds"][0]["val"]
    return {"seed": seed, "steps": steps, "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"], "test_accuracy": report["test"]["accuracy"],
            "test_balanced_accuracy": report["test"]["balanced_accuracy"], "wall_s": round(wall, 0), "reused": reused}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def format_table(results: list[dict[str, Any]], steps: list[int]) -> str:
    head = ["backbone", "size", "params (M)", "BYOL img/s", "fine-tune img/s", "BYOL epoch s", "full run min (config)",
            "BYOL epochs in budget", *(f"sup. 100% test acc. @{s}" for s in steps)]
    cells = []
    for r in results:
        acc = [_mean_std([x["test_accuracy"] for x in r["supervised_all"] if x["steps"] == s]) for s in steps]
        p = r["projected"]
        cells.append([r["backbone"], r["size"], f"{r['params_m']:.2f}", f"{r['speeds']['byol']:.0f}",
                      f"{r['speeds']['finetune']:.0f}", f"{p['byol_epoch_s']:.1f}", f"{p['full_run_s'] / 60:.1f}",
                      p["byol_epochs_in_budget"], *acc])
    return "\n".join(markdown_table(head, cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", help="an ingested data set (folder or s3:// prefix)")
    ap.add_argument("--config", default="configs/cpu.yaml", help="the recipe the candidates vary (default configs/cpu.yaml)")
    ap.add_argument("--candidates", nargs="+", default=["test_resnet@64", "resnet10t@64", "resnet10t@96", "resnet18@64"])
    ap.add_argument("--steps", nargs="+", type=int, default=[1200, 2400], help="supervised 100%% fine-tuning steps")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--budget-min", type=float, default=30.0, help="minutes one full run may take (default 30)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the step speeds (default: a Ray Train worker's, from ray.cpus_per_worker)")
    ap.add_argument("--step-seconds", type=float, default=4.0)
    ap.add_argument("--skip-accuracy", action="store_true", help="speeds and projections only")
    ap.add_argument("--reuse-only", action="store_true",
                    help="accuracy only from runs already made in --out (the others shown as not measured)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value, passed to every run")
    ap.add_argument("--out", default="outputs/recipe", help="run folders (default outputs/recipe)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "recipe.json"))
    args = ap.parse_args(argv)

    from raysemi.core.config import load_config

    candidates = [parse_candidate(c) for c in args.candidates]
    rows = dataset_rows(args.dataset)
    base = load_config(args.config, [f"data.path={args.dataset}", *args.sets])
    threads = args.threads or worker_threads(base)
    torch.set_num_threads(threads)
    t0 = time.time()
    results = []
    for backbone, size in candidates:
        sets = [f"model.backbone={backbone}", f"data.image_size={size}", *args.sets]
        cfg = load_config(args.config, [f"data.path={args.dataset}", *sets])
        from raysemi.models.backbone import backbone_for

        params = sum(p.numel() for p in backbone_for(cfg.model).parameters()) / 1e6
        speeds = step_speeds(cfg, args.repeat, args.step_seconds)
        projected = project(cfg, rows, speeds, args.budget_min * 60)
        print(f"{backbone}@{size}: {params:.2f} M parameters, BYOL {speeds['byol']:.0f} img/s, fine-tune "
              f"{speeds['finetune']:.0f} img/s, full run (config) {projected['full_run_s'] / 60:.1f} min, "
              f"{projected['byol_epochs_in_budget']} BYOL epochs fit in {args.budget_min:g} min", flush=True)
        results.append({"backbone": backbone, "size": size, "params_m": round(params, 3), "speeds": speeds,
                        "projected": projected, "supervised_all": []})
    if not args.skip_accuracy:
        for r in results:
            sets = [f"model.backbone={r['backbone']}", f"data.image_size={r['size']}", *args.sets]
            for seed in args.seeds:
                for steps in args.steps:
                    res = supervised_all(args.config, args.dataset, sets, steps, seed,
                                         Path(args.out) / f"{r['backbone']}@{r['size']}", args.reuse_only)
                    if res is None:
                        continue
                    r["supervised_all"].append(res)
                    print(f"{r['backbone']}@{r['size']} seed {seed} steps {steps}: val {res['val_accuracy']:.3f} "
                          f"test {res['test_accuracy']:.3f} ({res['wall_s']:.0f} s)", flush=True)
    table = format_table(results, args.steps)
    print(table)
    out = {"command": " ".join(["python bench/recipe.py", *(argv if argv is not None else sys.argv[1:])]),
           "dataset": args.dataset, "dataset_rows": rows, "config": args.config, "budget_min": args.budget_min, "threads": threads,
           "machine": machine_info(), "wall_s": round(time.time() - t0, 0), "results": results, "table": table}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
