"""The method against its baselines on one config: supervised only, BYOL + fine-tune, the full method.

    python bench/baselines.py --config CFG [--set key=value ...] [--out outputs/baselines]

Runs ``raysemi run --config CFG --set run.mode=MODE`` once per mode, each in its own folder ``<out>/<mode>``
and its own process, one after another (two local Rays side by side on one machine trip over each other:
Ray Train's placement-group cleaner refuses to choose between them). Then reads the ``report.json`` files and
prints test accuracy, balanced accuracy, macro-F1, one-vs-rest AUC and ECE of the model each run chose on
validation, with validation accuracy per round and pseudo-label precision. Writes
``bench/results/baselines-<config name>.json``. The modes share one pretraining when ``pretrain.cache`` is set
in the config (a tuning experiment's ``best_config.yaml`` sets it), which is why BYOL + fine-tune and the
full method cost no second pretraining after a sweep. A failed run fails the bench: no partial table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysemi.core.tables import markdown_table  # noqa: E402

MODES = ("supervised", "byol_finetune", "full")
LABELS = {"supervised": "supervised only", "byol_finetune": "BYOL + fine-tune", "full": "full method"}


def run_mode(config: str, sets: list[str], out: Path, mode: str) -> tuple[dict[str, Any], float, str]:
    """One ``raysemi run`` in a subprocess; its report, wall time and command line."""
    run_dir = out / mode
    cmd = [str(Path(sys.executable).parent / "raysemi"), "run", "--config", config, "--overwrite",
           "--set", f"run.mode={mode}", "--set", f"run.output_dir={run_dir}", "--set", f"run.name=baseline-{mode}"]
    for kv in sets:
        cmd += ["--set", kv]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / f"{mode}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"bench/baselines.py: error: {mode} run failed (exit {rc}), see {out / f'{mode}.log'}")
    return json.loads((run_dir / "report.json").read_text()), time.time() - t0, " ".join(cmd[1:])


def summarise(mode: str, report: dict[str, Any], wall: float, command: str) -> dict[str, Any]:
    test = report["test"]
    return {
        "mode": mode, "label": LABELS[mode], "command": f"raysemi {command}",
        "labelled": report["data"]["n_train_labeled"], "test_images": test["n"],
        "best_round": report["best_round"],
        "val_accuracy_per_round": [round(r["val"]["accuracy"], 4) for r in report["rounds"]],
        "pseudo_precision_per_round": [r.get("pseudo_precision") for r in report["rounds"][1:]],
        "test_accuracy": test["accuracy"], "test_balanced_accuracy": test["balanced_accuracy"],
        "test_macro_f1": test["macro_f1"], "test_auc_ovr": test.get("auc_ovr"), "test_ece": test.get("ece"),
        "pretrain_reused": report["run"].get("pretrain_reused"), "stages_s": report["stages"],
        "wall_s": round(wall, 1),
    }


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return " / ".join(_f(x) for x in v) or "-"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "labels", "test acc", "balanced acc", "macro-F1", "AUC (ovr)", "ECE", "val acc per round",
            "pseudo-label precision per round", "chosen round"]
    body = []
    for r in rows:
        auc = r["test_auc_ovr"].get("macro") if isinstance(r["test_auc_ovr"], dict) else r["test_auc_ovr"]
        cells = [r["label"], str(r["labelled"]), _f(r["test_accuracy"]), _f(r["test_balanced_accuracy"]),
                 _f(r["test_macro_f1"]), _f(auc), _f(r["test_ece"]), _f(r["val_accuracy_per_round"]),
                 _f(r["pseudo_precision_per_round"]), str(r["best_round"])]
        body.append(cells)
    return "\n".join(markdown_table(head, body))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a raysemi config (e.g. a sweep's best_config.yaml)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value, passed to every run")
    ap.add_argument("--out", default="outputs/baselines", help="run folders (default outputs/baselines)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--results", default=None, help="JSON to write (default bench/results/baselines-<config>.json)")
    args = ap.parse_args(argv)
    if not Path(args.config).is_file():
        raise SystemExit(f"bench/baselines.py: error: config {args.config} does not exist")
    out = Path(args.out).resolve()
    done = [(m, *run_mode(args.config, args.sets, out, m)) for m in args.modes]
    rows = [summarise(*d) for d in done]
    table = format_table(rows)
    print(table)
    name = Path(args.config).stem if Path(args.config).stem != "best_config" else Path(args.config).parent.name
    dest = Path(args.results or ROOT / "bench" / "results" / f"baselines-{name}.json")
    dest.write_text(json.dumps({"benchmark": "baselines", "config": args.config, "sets": args.sets,
                                "rows": rows, "table": table}, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
