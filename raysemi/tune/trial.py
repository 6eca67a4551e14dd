"""One Tune trial: ``run_pipeline`` with the sampled values, reporting to Tune after every round.

The trial runs the pipeline in its own process, as Ray Train V2 intends (``Tuner(driver_fn)`` whose driver
builds and fits ``TorchTrainer`` s). Tune schedules the trial in a placement group of ``TRIAL_CPU`` that
captures its child tasks and actors (``placement_group_capture_child_tasks``). Train V2's controller asks for
no CPU, so it fits that bundle, and it places the Train workers in a placement group of its own; the other
stages' tasks and actors (pseudo-label pool, evaluation, the pretraining cache's lock) opt out of the
captured group with ``scheduling_strategy="DEFAULT"`` (``ray_utils.OUTSIDE_PLACEMENT_GROUP``), which Ray
documents as the way out. So the pipeline needs no actor of its own beside the trial, and no polling.

Each trial reports after every round (ASHA can stop it) with a small checkpoint (the rounds done), and works
in ``<exp>/trials/<trial id>`` (``run.name`` = the trial id), resuming its finished rounds after a failure
(``FailureConfig``) or ``--resume``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from raysemi.core.config import from_dict
from raysemi.core.io import join, read_json
from raysemi.pipeline.rounds import RoundResult, chosen_round

log = logging.getLogger("raysemi.tune")

STATE = "trial_state.json"


def plain(value: Any) -> Any:
    """A sampled value as a plain Python scalar (Tune may hand numpy scalars)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, list | tuple | str) else value


def trial_dir(exp: str, trial_id: str) -> str:
    """Where a trial's pipeline writes its run: ``<exp>/trials/<trial id>``."""
    return join(exp, "trials", trial_id)


def best_so_far(rounds: list[dict[str, Any]], metric: str) -> RoundResult:
    """The round the pipeline would keep among those so far (``RoundResult.to_dict`` each, as checkpointed)."""
    return chosen_round([RoundResult.from_dict(r) for r in rounds], metric)


def _val_metrics(result: RoundResult) -> dict[str, Any]:
    return {"val_accuracy": result.val["accuracy"], "val_macro_f1": result.val.get("macro_f1"),
            "val_balanced_accuracy": result.val.get("balanced_accuracy")}


def _report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, STATE).write_text(json.dumps(state))
        tune.report({k: v for k, v in metrics.items() if v is not None},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: the pipeline with the sampled values, reporting after every round and at the end."""
    from ray import tune

    from raysemi.pipeline.run import run_pipeline  # the trial's work; imported where Ray Tune runs it

    t0 = time.time()
    trial_id = tune.get_context().get_trial_id()
    values = {k: plain(v) for k, v in config.items()}
    cfg = from_dict(setup["base"]).replace(
        **values, **{"run.output_dir": trial_dir(setup["exp"], trial_id), "run.name": trial_id})
    state: dict[str, Any] = {"rounds": [], "elapsed_s": 0.0, "attempts": 0}
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads(Path(d, STATE).read_text())
        log.info("trial %s resumes after round %s", trial_id, [r["round"] for r in state["rounds"]])
    state["attempts"] += 1
    done = {r["round"] for r in state["rounds"]}
    elapsed0 = state["elapsed_s"]

    def on_round(result: RoundResult, pretrain_reused: bool) -> None:
        if result.round in done:  # reported before this trial was restored
            return
        state["rounds"].append(result.to_dict())
        state["elapsed_s"] = elapsed0 + time.time() - t0
        best = best_so_far(state["rounds"], cfg.run.select_metric)
        _report({"round": result.round, "round_val_accuracy": result.val["accuracy"], **_val_metrics(best),
                 "best_round": best.round, "n_pseudo": result.n_pseudo,
                 "pretrain_reused": pretrain_reused, "wall_s": state["elapsed_s"], "completed": False},
                state)

    report = read_json(run_pipeline(cfg, resume=True, config_path=setup.get("config_path", ""), on_round=on_round))
    rounds = [RoundResult.from_dict(r) for r in report["rounds"]]
    best = rounds[report["best_round"]]  # chosen by the pipeline with chosen_round, as after each round above
    state["elapsed_s"] = elapsed0 + time.time() - t0
    _report({"round": rounds[-1].round, "round_val_accuracy": rounds[-1].val["accuracy"], **_val_metrics(best),
             "best_round": best.round,
             "test_accuracy": report["test"]["accuracy"], "test_macro_f1": report["test"].get("macro_f1"),
             "pretrain_reused": bool(report["run"].get("pretrain_reused")),
             "pretrain_s": report["stages"].get("pretrain"), "wall_s": state["elapsed_s"],
             "attempts": state["attempts"], "completed": True}, state)
