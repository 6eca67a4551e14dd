"""Few-label quality of one recipe on any ingested data sets: the method against its baselines, over label seeds.

    python bench/quality.py DATASET [DATASET ...] [--config configs/cpu.yaml] [--seeds 0 1 2]
                            [--labels 10/class 50/class 10% 100%] [--steps-menu 300 600 1200 2400] [--set k=v ...]

For every data set (a raysemi dataset folder or s3:// prefix), every rung of the label ladder (``--labels``:
``N/class`` labels per class, ``P%`` of the train labels; by default the config's own choice) and every label
seed, with the same config (so the same optimizer steps per round for every row):

- supervised at the rung (random init, labelled rows only),
- supervised at 100% of the train labels (the ceiling the method is measured against; once per seed),
- BYOL + fine-tune at the rung: round 0 of the full method's run (the same computation: same
  pretrained weights, labelled rows, steps and seed), evaluated on test,
- the full method (BYOL, fine-tune, pseudo-label rounds; the round chosen on validation by
  ``run.select_metric``),
- FixMatch (Sohn et al. 2020, the method paper's Table 2 comparison; ``run.mode=fixmatch``): the BYOL weights
  fine-tuned on the labelled rows plus FixMatch's consistency loss on the pool, with ``--methods`` naming it
  (``--methods supervised full fixmatch``; by default the first two).

With ``--steps-menu 300 600 1200 2400`` nothing wins or loses by compute: every row (each seed) runs once per
fine-tuning length and keeps the one that validates best (the full method by its chosen round, BYOL +
fine-tune by the full runs' round 0), and the table reports the steps chosen and the images seen.

For each method row of a rung, the share of the gap it closes:
``(method - supervised at the rung) / (supervised at 100% - supervised at the rung)``, on the means over seeds
of accuracy and of balanced accuracy (1 = as good as every label; 0 = no better than supervised at the rung).

The label seed picks which train labels are kept (``data.label_seed``) and seeds fine-tuning
(``finetune.seed``); pretraining is computed once per data set and shared through ``pretrain.cache``
(it does not see labels). Each run is ``raysemi run`` in its own process and folder
``<out>/<dataset>/<row>-seed<S>``; a folder that already holds a ``report.json`` of the same computation
(its resolved config equal in every part that its mode uses) is reused, so an interrupted bench continues
where it stopped and a change of pseudo-label settings reruns only the full method. Nothing is tuned to a class name or a count:
the table is mean +- std over seeds of test accuracy, balanced accuracy, macro-F1 and one-vs-rest AUC,
printed and written to ``bench/results/quality-<config>.md`` and ``.json``. A failed run fails the bench
(no partial table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raysemi.core.tables import markdown_table

ALL_LABELS = "100%"
ROOT = Path(__file__).resolve().parents[1]
RAYSEMI = str(Path(sys.executable).parent / "raysemi")
ROWS = (
    ("supervised", "supervised, few labels"),
    ("supervised_all", "supervised, all labels"),
    ("byol_finetune", "BYOL + fine-tune, few labels"),
    ("full", "full method, few labels"),
    ("fixmatch", "FixMatch from BYOL, few labels"),
)
METHODS = ("supervised", "full", "fixmatch")  # the runs of a rung (BYOL + fine-tune is the full method's round 0)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr")


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"bench/quality.py: error: run failed (exit {rc}): {' '.join(cmd[1:])}; see {log}")


def _relevant(cfg: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved config that a run's result depends on (per ``run.mode``), without its name
    and folder: a supervised run does not depend on pretraining or pseudo-labelling settings."""
    cfg = {k: dict(v) for k, v in cfg.items()}
    for key in ("output_dir", "name"):
        cfg["run"].pop(key, None)
    if cfg["run"]["mode"] != "full":
        cfg.pop("pseudolabel")
    if cfg["run"]["mode"] != "fixmatch" and not (cfg["run"]["mode"] == "full" and cfg.get("fixmatch", {}).get("in_rounds")):
        cfg.pop("fixmatch", None)
    if cfg["run"]["mode"] == "supervised":
        cfg.pop("pretrain")
    return cfg


def _reusable(run_dir: Path, config: str, overrides: list[str]) -> bool:
    """A finished run of the same computation: its report exists and its resolved config matches."""
    if not (run_dir / "report.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    from raysemi.core.config import ConfigError, absolute_paths, from_dict, load_config

    want = absolute_paths(load_config(config, overrides)).to_dict()
    try:  # through the config tree, so that a key added since (with its default) compares equal
        have = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).to_dict()
    except ConfigError:
        return False
    return _relevant(want) == _relevant(have)


def run_one(config: str, sets: list[str], run_dir: Path) -> tuple[dict[str, Any], float, bool]:
    """``raysemi run`` with ``sets`` in ``run_dir``; its report, wall seconds and whether it was reused."""
    overrides = [*sets, f"run.output_dir={run_dir}", f"run.name=quality-{run_dir.name}"]
    if _reusable(run_dir, config, overrides):
        report = json.loads((run_dir / "report.json").read_text())
        return report, sum(report.get("stages", {}).values()), True  # its stages' time when it ran
    cmd = [RAYSEMI, "run", "--config", config, "--overwrite"]
    for kv in overrides:
        cmd += ["--set", kv]
    t0 = time.time()
    _run(cmd, run_dir.parent / f"{run_dir.name}.log")
    return json.loads((run_dir / "report.json").read_text()), time.time() - t0, False


def evaluate_round(config: str, sets: list[str], run_dir: Path, round_: int) -> dict[str, Any]:
    """Test metrics of round ``round_``'s model of a finished run (``raysemi evaluate``)."""
    out = run_dir / f"evaluate-round{round_}"
    report = out / "evaluate-test" / "report.json"
    if not report.is_file():
        model = run_dir / f"round={round_}" / "classifier.safetensors"
        cmd = [RAYSEMI, "evaluate", "--config", config, "--model", str(model), "--split", "test"]
        for kv in [*sets, f"run.output_dir={out}"]:
            cmd += ["--set", kv]
        _run(cmd, run_dir.parent / f"{run_dir.name}-evaluate-round{round_}.log")
    return json.loads(report.read_text())["test"]


def _auc(test: dict[str, Any]) -> float | None:
    auc = test.get("auc_ovr")
    return auc.get("macro") if isinstance(auc, dict) else auc


def rung_sets(rung: str | None) -> tuple[str, list[str]]:
    """A rung of the label ladder as (folder tag, config overrides): ``N/class``, ``P%`` (0 < P <= 100), or
    None for the config's own label choice. Anything else is refused in one line."""
    if rung is None:
        return "", []
    text = rung.strip()
    try:
        if text.endswith("/class"):
            n = int(text[: -len("/class")])
            if n >= 1:
                return f"{n}perclass", ["data.label_fraction=null", f"data.labels_per_class={n}"]
        elif text.endswith("%"):
            pct = float(text[:-1])
            if pct == 100:
                return "100pc", ["data.label_fraction=null", "data.labels_per_class=null"]
            if 0 < pct < 100:
                return f"{pct:g}pc", [f"data.label_fraction={pct / 100:g}", "data.labels_per_class=null"]
    except ValueError:
        pass
    raise SystemExit(f"bench/quality.py: error: --labels {rung!r}: use N/class (N >= 1) or P% (0 < P <= 100)")


def choose_steps(scored: list[tuple[int, float]]) -> int:
    """The fine-tuning length of the menu with the best validation score; the shorter one on a tie."""
    return max(scored, key=lambda sv: (sv[1], -sv[0]))[0]


def _val(report: dict[str, Any], round_: int) -> float:
    return report["rounds"][round_]["val"][report["run"].get("select_metric", "accuracy")]


def run_menu(config: str, sets: list[str], run_dir: Path, menu: list[int] | None) -> list[tuple[int | None, Path, Any]]:
    """``run_one`` once per fine-tuning length of ``menu`` (folders ``<run_dir>-steps<S>``), or once with the
    config's own length; ``[(steps, folder, (report, wall, reused))]``."""
    if not menu:
        return [(None, run_dir, run_one(config, sets, run_dir))]
    done = []
    for steps in menu:
        folder = run_dir.with_name(f"{run_dir.name}-steps{steps}")
        done.append((steps, folder, run_one(config, [*sets, f"finetune.steps={steps}"], folder)))
    return done


def _pick(done: list[tuple[int | None, Path, Any]], round_of) -> tuple[int | None, Path, Any]:
    """The run of the menu whose chosen round (``round_of(report)``) validates best."""
    if len(done) == 1:
        return done[0]
    steps = choose_steps([(s, _val(r[0], round_of(r[0]))) for s, _, r in done])
    return next(d for d in done if d[0] == steps)


def measure(config: str, dataset: str, seed: int, extra: list[str], out: Path,
            rungs: list[str | None], menu: list[int] | None = None,
            methods: tuple[str, ...] = ("supervised", "full")) -> list[dict[str, Any]]:
    """Every row of one data set and one label seed: supervised at 100% once, and per rung below 100%
    supervised, BYOL + fine-tune, the full method and the other ``methods``. With a step ``menu`` every row picks its fine-tuning
    length on validation among the menu's runs (BYOL + fine-tune by round 0 of the full method's runs)."""
    base = [f"data.path={dataset}", f"data.label_seed={seed}", f"finetune.seed={seed}",
            f"pretrain.cache={out / 'pretrain_cache'}", *extra]
    _, all_sets = rung_sets(ALL_LABELS)
    done = run_menu(config, [*base, "run.mode=supervised", *all_sets], out / f"supervised_all-seed{seed}", menu)
    steps, _, (report, wall, reused) = _pick(done, lambda r: 0)
    rows = [_row("supervised_all", seed, report, report["test"], wall, reused, report["best_round"], ALL_LABELS, steps)]
    for rung in rungs:
        tag, sets = rung_sets(rung)
        if tag == "100pc":
            continue  # the ceiling, measured above
        where = out / tag if tag else out
        for key in methods:
            mode = [f"run.mode={key}"]
            done = run_menu(config, base + sets + mode, where / f"{key}-seed{seed}", menu)
            steps, _, (report, wall, reused) = _pick(done, lambda r: r["best_round"])
            rows.append(_row(key, seed, report, report["test"], wall, reused, report["best_round"], rung, steps))
            if key == "full":
                steps0, run_dir, (report0, _, _) = _pick(done, lambda r: 0)
                test0 = evaluate_round(config, base + sets + mode, run_dir, 0)
                r0 = dict(report0, rounds=report0["rounds"][:1])
                rows.append(_row("byol_finetune", seed, r0, test0, 0.0, True, 0, rung, steps0))
    return rows


def gap_closed(rows: list[dict[str, Any]], rung: str | None, key: str, metric: str) -> float | None:
    """``(method - supervised at the rung) / (supervised at 100% - supervised at the rung)`` on the means over
    seeds of ``metric``; None when a side is missing or supervised at the rung already equals the ceiling."""
    def mean(row: str, r: str | None) -> float | None:
        vals = [x[metric] for x in rows if x["row"] == row and x["rung"] == r and x[metric] is not None]
        return statistics.mean(vals) if vals else None

    method, low, high = mean(key, rung), mean("supervised", rung), mean("supervised_all", ALL_LABELS)
    if method is None or low is None or high is None or abs(high - low) < 1e-9:
        return None
    return (method - low) / (high - low)


def _row(key: str, seed: int, report: dict[str, Any], test: dict[str, Any], wall: float, reused: bool,
         best: int, rung: str | None, steps_chosen: int | None = None) -> dict[str, Any]:
    return {
        "row": key, "rung": rung, "seed": seed, "labelled": report["data"]["n_train_labeled"], "test_images": test["n"],
        "steps_chosen": steps_chosen,  # from the step menu (None: the config's own length)
        "images_seen": sum(r.get("images_seen") or 0 for r in report["rounds"]),
        **{m: (_auc(test) if m == "auc_ovr" else test[m]) for m in METRICS},
        "per_class_recall": {c: v.get("recall") for c, v in test.get("per_class", {}).items()}
        if isinstance(test.get("per_class"), dict) else None,
        "predicted_classes": sum(1 for v in _col_sums(test["confusion"]) if v),  # 1 = a collapsed model
        "best_round": best,
        "val_per_round": [round(r["val"][report["run"].get("select_metric", "accuracy")], 4)
                          for r in report["rounds"]],
        "steps_per_round": [r.get("steps") for r in report["rounds"]],
        "pseudo_precision": [r.get("pseudo_precision") for r in report["rounds"][1:]],
        "stages_s": report.get("stages"), "wall_s": round(wall, 1), "reused": reused,
    }


def _col_sums(matrix: list[list[int]]) -> list[int]:
    """Predictions per class (the confusion matrix's rows are the truth, its columns the predictions)."""
    return [sum(row[j] for row in matrix) for j in range(len(matrix))]


def _mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def _gap_cell(rows: list[dict[str, Any]], rung: str | None, key: str) -> str:
    if key not in ("byol_finetune", "full", "fixmatch"):
        return "-"
    gaps = [gap_closed(rows, rung, key, m) for m in ("accuracy", "balanced_accuracy")]
    return " / ".join("-" if g is None else f"{100 * g:.0f}%" for g in gaps)


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    head = ["data set", "labels", "method", "labelled rows", "seeds", "accuracy", "balanced acc.", "macro-F1",
            "AUC (ovr)", "gap closed (acc. / bal.)", "min. classes predicted", "full: rounds chosen",
            "steps chosen", "images seen"]
    body = []
    for dataset, rows in results.items():
        rungs = list(dict.fromkeys(r["rung"] for r in rows if r["row"] != "supervised_all"))
        for rung, (key, label) in [(r, k) for r in rungs for k in ROWS if k[0] != "supervised_all"] + \
                [(ALL_LABELS, k) for k in ROWS if k[0] == "supervised_all"]:
            mine = [r for r in rows if r["row"] == key and r["rung"] == rung]
            if not mine:
                continue
            cells = [Path(dataset).name, rung or "config", label,
                     "/".join(sorted({str(r["labelled"]) for r in mine})), str(len(mine)),
                     *(_mean_std([r[m] for r in mine]) for m in METRICS), _gap_cell(rows, rung, key),
                     str(min(r["predicted_classes"] for r in mine)),
                     " ".join(str(r["best_round"]) for r in mine) if key == "full" else "-",
                     " ".join("config" if r.get("steps_chosen") is None else str(r["steps_chosen"]) for r in mine),
                     f"{statistics.mean(r.get('images_seen') or 0 for r in mine):.0f}"]
            body.append(cells)
    return "\n".join(markdown_table(head, body))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", help="ingested data sets (folders or s3:// prefixes)")
    ap.add_argument("--config", default="configs/cpu.yaml", help="the recipe (default configs/cpu.yaml)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label seeds (default 0 1 2)")
    ap.add_argument("--labels", nargs="+", default=None,
                    help="the label ladder: rungs N/class or P%% (default: the config's own label choice)")
    ap.add_argument("--steps-menu", nargs="+", type=int, default=None,
                    help="fine-tuning lengths every row chooses from on validation (default: the config's own)")
    ap.add_argument("--methods", nargs="+", default=["supervised", "full"], choices=METHODS,
                    help="the runs of each rung (default: supervised full; BYOL + fine-tune is full's round 0)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value, passed to every run")
    ap.add_argument("--out", default="outputs/quality", help="run folders (default outputs/quality)")
    ap.add_argument("--results", default=None, help="JSON to write (default bench/results/quality-<config>.json)")
    args = ap.parse_args(argv)
    rungs: list[str | None] = list(args.labels) if args.labels else [None]
    for rung in rungs:
        rung_sets(rung)  # refused here, before any run
    if args.steps_menu is not None and (min(args.steps_menu) < 1 or len(set(args.steps_menu)) != len(args.steps_menu)):
        raise SystemExit(f"bench/quality.py: error: --steps-menu {args.steps_menu}: distinct step counts >= 1")
    if not Path(args.config).is_file():
        raise SystemExit(f"bench/quality.py: error: config {args.config} does not exist")
    for d in args.datasets:
        if "://" not in d and not (Path(d) / "manifest.json").is_file():
            raise SystemExit(f"bench/quality.py: error: {d} is not an ingested data set (no manifest.json)")
    t0 = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    for d in args.datasets:
        out = Path(args.out).resolve() / Path(d.rstrip("/")).name
        results[d] = []
        for seed in args.seeds:
            t1 = time.time()
            results[d] += measure(args.config, d, seed, args.sets, out, rungs, args.steps_menu, tuple(args.methods))
            print(f"{Path(d).name} seed {seed}: {time.time() - t1:.0f} s", flush=True)
    table = format_table(results)
    print(table)
    wall = time.time() - t0
    stem = Path(args.config).stem
    dest = Path(args.results or ROOT / "bench" / "results" / f"quality-{stem}.json")
    command = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from bench.machine import machine_info

    dest.write_text(json.dumps({"benchmark": "quality", "command": command, "machine": machine_info(),
                                "config": args.config,
                                "config_values": cfg, "sets": args.sets, "seeds": args.seeds, "labels": rungs,
                                "steps_menu": args.steps_menu, "methods": args.methods,
                                "wall_s": round(wall, 1), "table": table, "runs": results}, indent=2) + "\n")
    runs_s = sum(r["wall_s"] for rows in results.values() for r in rows)
    dest.with_suffix(".md").write_text(
        f"# bench/quality.py\n\n`{command}`: {runs_s / 60:.0f} min of runs (reused runs count the time their "
        f"stages took when they ran), {wall / 60:.0f} min for this invocation\n\n{table}\n")
    print(f"written to {dest} and {dest.with_suffix('.md')}")


if __name__ == "__main__":
    main()
