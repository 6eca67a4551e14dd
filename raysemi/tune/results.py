"""The results of an experiment: one row per trial, the best trial, and the files of ``<out>/<name>/``.

``tune_results.csv`` and ``.md`` (one row per trial), ``heatmap.png`` (``tune.heatmap``) and
``best_config.yaml``. Rows come from ``ExperimentAnalysis.trials`` rather than ``ResultGrid``: a row needs
the trial's saved status (to tell "stopped early" from "unfinished") and its failure count, which a
``ray.tune.Result`` does not carry, and the best trial is the best *completed* one (ties to the first trial
id), which ``ResultGrid.get_best_result`` cannot express (it would pick an ASHA-stopped trial).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from raysemi.core.config import Config, ConfigError, config_to_yaml
from raysemi.core.io import join, read_config_beside, write_bytes_atomic
from raysemi.core.tables import fmt, markdown_table
from raysemi.tune.heatmap import HEATMAP_AXES, heatmap_png
from raysemi.tune.space import Space
from raysemi.tune.trial import plain, trial_dir

FILES = {"csv": "tune_results.csv", "md": "tune_results.md", "heatmap": "heatmap.png",
         "best_config": "best_config.yaml"}
# wall_s: the trial's wall time (all attempts); pretrain_s: its time in the pretraining stage, waiting for
# another trial's pretraining included; pretrain_cost_s: what computing that pretraining took.
COLUMNS = ("status", "val_accuracy", "test_accuracy", "best_round", "wall_s", "pretrain_s", "pretrain_reused",
           "pretrain_cost_s", "pretrain_key", "failures")


@dataclass
class TuneSummary:
    exp: str  # the experiment folder (local or s3://)
    rows: list[dict[str, Any]]  # one per trial, see ``collect_rows``
    best: dict[str, Any] | None  # the best completed row
    files: dict[str, str]  # kind -> URI (csv, md, heatmap, best_config)
    interrupted: bool  # some trials unfinished: resume with --resume
    text: str  # what ``raysemi tune`` prints


def collect_rows(trials, space: Space, base: Config) -> list[dict[str, Any]]:
    """One row per trial: id, status, sampled values, accuracies, time, whether its pretraining was reused."""
    from raysemi.pipeline.pretrain_cache import cache_key, lookup, manifest_sha256

    manifest_sha = manifest_sha256(base.data.path)
    costs: dict[str, float | None] = {}
    rows = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        m = t.last_result or {}
        values = {k: plain(t.config.get(k)) for k in space.params}
        if t.status == "TERMINATED":
            status = "completed" if m.get("completed") else "stopped early"
        else:
            status = "error" if t.status == "ERROR" else "unfinished"
        try:
            key = cache_key(base.replace(**values), manifest_sha)
        except ConfigError:
            key = None
        cost = m.get("pretrain_s")  # without the cache: this trial's own pretraining
        if key and base.pretrain.cache:  # with it: what the shared pretraining took to compute
            if key not in costs:
                marker = lookup(base.pretrain.cache, key)
                costs[key] = marker.get("seconds") if marker else None
            cost = costs[key]
        rows.append({
            "trial_id": t.trial_id, "status": status, **values,
            "metric": m.get(space.metric), "val_accuracy": m.get("val_accuracy"),
            "test_accuracy": m.get("test_accuracy"), "best_round": m.get("best_round"),
            "rounds_done": m.get("round", -1) + 1,
            "wall_s": m.get("wall_s"), "pretrain_s": m.get("pretrain_s"),
            "pretrain_reused": m.get("pretrain_reused"), "pretrain_key": key[:12] if key else None,
            "pretrain_cost_s": cost, "failures": t.num_failures,
        })
    return rows


def choose_best(rows: list[dict[str, Any]], space: Space) -> dict[str, Any] | None:
    """The completed row with the best metric, or None when no trial completed."""
    done = [r for r in rows if r["status"] == "completed" and r["metric"] is not None]
    if not done:
        return None
    sign = 1 if space.mode == "max" else -1
    return max(done, key=lambda r: sign * r["metric"])  # rows come sorted by trial id: ties go to the first


def results_csv(rows: list[dict[str, Any]], space: Space) -> bytes:
    """``tune_results.csv``: one line per trial, empty cells for missing values."""
    buf = io.StringIO()
    cols = ["trial_id", *space.params, *COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return buf.getvalue().encode()


def pretrain_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many trials pretrained, how many reused a cached pretraining, how many distinct settings."""
    known = [r for r in rows if r["pretrain_reused"] is not None]
    return {"trials": len(rows), "pretrained": len(known),
            "reused": sum(1 for r in known if r["pretrain_reused"]),
            "computed": sum(1 for r in known if not r["pretrain_reused"]),
            "distinct": len({r["pretrain_key"] for r in rows if r["pretrain_key"]})}


def results_markdown(rows: list[dict[str, Any]], space: Space, name: str, best: dict[str, Any] | None,
                     heatmap: bool) -> str:
    """``tune_results.md``: counts, the trials best first, the best trial and the heat map link."""
    status = {s: sum(1 for r in rows if r["status"] == s) for s in ("completed", "stopped early", "error",
                                                                      "unfinished")}
    c = pretrain_counts(rows)
    sign = -1 if space.mode == "max" else 1
    ordered = sorted(rows, key=lambda r: (r["status"] != "completed", r["metric"] is None,
                                          sign * (r["metric"] or 0), r["trial_id"]))
    cols = ["trial_id", *space.params, *COLUMNS]
    lines = [
        f"# Tune results: {name}", "",
        f"Space `{space.path or space.name}` ({space.description.strip() or 'no description'}); "
        f"selection metric `{space.metric}` ({space.mode}), validation split.", "",
        f"Trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in status.items() if n)}). "
        f"Pretraining: {c['computed']} computed, {c['reused']} reused from the cache "
        f"({c['distinct']} distinct pretraining settings).", "",
        *markdown_table(cols, ([fmt(r.get(col)) for col in cols] for r in ordered)),
    ]
    lines.append("")
    if best is not None:
        picked = ", ".join(f"{k}={fmt(best[k])}" for k in space.params)
        lines.append(f"Best trial: **{best['trial_id']}** ({picked}): validation accuracy "
                     f"{fmt(best['val_accuracy'])}, test accuracy {fmt(best['test_accuracy'])}; "
                     f"config in `{FILES['best_config']}`.")
    else:
        lines.append("No trial completed: no best configuration yet.")
    if heatmap:
        lines += ["", f"![test accuracy over pretraining epochs x learning rate]({FILES['heatmap']})"]
    lines += ["", "Curves of every trial (pretraining, each round's fine-tuning, the round summary): "
              "`pip install tensorboard`, then `tensorboard --logdir` this folder."]
    return "\n".join(lines) + "\n"


def best_config_yaml(exp: str, name: str, best: dict[str, Any]) -> str:
    """The resolved config of the best trial, ready for ``raysemi run --config`` (output in <exp>/best_run)."""
    cfg = read_config_beside(trial_dir(exp, best["trial_id"]))
    cfg = cfg.replace(**{"run.output_dir": join(exp, "best_run"), "run.name": f"{name}-best"})
    head = (f"# Best trial of tune experiment {name}: {best['trial_id']} (validation accuracy "
            f"{fmt(best['val_accuracy'])}, test accuracy {fmt(best['test_accuracy'])}).\n"
            f"# Re-run it with: raysemi run --config best_config.yaml\n")
    return head + config_to_yaml(cfg)


def write_outputs(exp: str, name: str, space: Space, base: Config, rows: list[dict[str, Any]]) -> TuneSummary:
    """Write the experiment's files and return what ``raysemi tune`` prints."""
    best = choose_best(rows, space)
    files = {"csv": join(exp, FILES["csv"]), "md": join(exp, FILES["md"])}
    png = None
    if any(axis in space.params for axis in HEATMAP_AXES):
        png = heatmap_png(rows, base, f"{name}: test accuracy (best validation trial per cell)")
    if png is not None:
        files["heatmap"] = join(exp, FILES["heatmap"])
        write_bytes_atomic(files["heatmap"], png)
    if best is not None:
        files["best_config"] = join(exp, FILES["best_config"])
        write_bytes_atomic(files["best_config"], best_config_yaml(exp, name, best).encode())
    md = results_markdown(rows, space, name, best, png is not None)
    write_bytes_atomic(files["csv"], results_csv(rows, space))
    write_bytes_atomic(files["md"], md.encode())
    interrupted = any(r["status"] == "unfinished" for r in rows)
    text = md + "\n" + "\n".join(f"{k}: {v}" for k, v in files.items())
    if interrupted:
        text += f"\n\ninterrupted: {sum(r['status'] == 'unfinished' for r in rows)} trials unfinished; " \
                f"continue with: raysemi tune --resume --name {name} --out {exp.rsplit('/', 1)[0]}"
    return TuneSummary(exp, rows, best, files, interrupted, text)
