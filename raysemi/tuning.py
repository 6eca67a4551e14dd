"""``raysemi tune``: a Ray Tune experiment whose every trial is one ``run_pipeline`` with sampled values.

Spaces (``tune_spaces/*.yaml``) use a small explicit notation over any dotted config key, translated to
``ray.tune`` in one place (``Param.to_tune``)::

    params:
      pretrain.epochs:    {grid: [50, 150, 250]}       # every value, crossed with the other grids
      pretrain.lr:        {choice: [0.03, 0.01]}       # one value drawn per sample
      finetune.lr:        {loguniform: [0.001, 0.1]}   # log-uniform float in [lo, hi]
      finetune.label_smoothing: {uniform: [0.0, 0.2]}  # uniform float in [lo, hi]
      pseudolabel.rounds: {randint: [1, 3]}            # integer in [lo, hi], both ends included

plus ``metric``/``mode`` (what the trials report after every round: ``val_accuracy`` = best round so far,
``round_val_accuracy``, ``val_macro_f1``), ``num_samples`` and ``seed`` (random draws per grid point),
``set`` (fixed overrides for every trial), ``scheduler: {name: asha, ...}`` (early stopping on the metric
after each round) and ``search: random`` (Ray's BasicVariantGenerator; ``optuna`` where installed).

Trials follow Ray Train V2's pattern: a function trial (``Tuner(driver_fn)``, 0.01 CPU of its own) runs the
pipeline, whose stages build and fit their own ``TorchTrainer`` s, named from the trial id
(``run.name = <trial id>``); ``max_concurrent_trials`` = the cluster's GPUs (CPUs without GPUs) over what
one trial's stages need. The pipeline itself runs in a ``PipelineRunner`` actor beside the trial, outside
the trial's placement group (which would capture the stages' tasks and actor pools into its 0.01 CPU). Each trial reports after every round (ASHA can stop it) with a small checkpoint
(the rounds done), and works in ``<exp>/trials/<trial id>``, resuming its finished rounds after a failure
(``FailureConfig``) or ``--resume``. Pretrainings go through the content-addressed cache
(``raysemi.pretrain_cache``, ``<out>/pretrain_cache`` unless ``pretrain.cache`` says otherwise).

Outputs in ``<out>/<name>/``: ``tune_results.csv`` and ``.md`` (one row per trial), ``heatmap.png``
(test accuracy over pretraining epochs x lr, the shape of the paper's Table 1) and ``best_config.yaml``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from raysemi import io as rio
from raysemi.config import Config, ConfigError, absolute_paths, config_to_yaml, from_dict, load_config
from raysemi.errors import RaysemiError
from raysemi.io import filesystem, is_remote, join, write_bytes_atomic

log = logging.getLogger("raysemi.tuning")

NOTATIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TRIAL_METRICS = ("val_accuracy", "round_val_accuracy", "val_macro_f1", "val_balanced_accuracy")  # in every report of every trial
RESERVED = ("run.output_dir", "run.name", "pretrain.cache")  # set per trial by raysemi tune
SPACE_KEYS = ("description", "metric", "mode", "num_samples", "seed", "search", "scheduler", "set", "params")
TRIAL_CPU = 0.01  # the trial (driver) itself; its stages reserve their own workers
TUNE_FAULT_ENV = "RAYSEMI_TUNE_INJECT_FAILURE"  # test hook: "<trial index>:<round>:<marker path>"
SETUP = "raysemi_tune.json"
STATE = "trial_state.json"
FILES = {"csv": "tune_results.csv", "md": "tune_results.md", "heatmap": "heatmap.png",
         "best_config": "best_config.yaml"}
HEATMAP_AXES = ("pretrain.epochs", "pretrain.lr")
MAX_HEATMAP_VALUES = 12


class SpaceError(RaysemiError):
    """A search space that cannot be used, said in one line naming the file and key."""


# ---------------------------------------------------------------- spaces


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # one of NOTATIONS
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform/randint: (lo, hi)

    def to_tune(self):
        """The ``ray.tune`` domain of this parameter (the one place the notation is translated)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # ours includes hi, Ray's excludes it

    def representatives(self) -> list[Any]:
        """Values that validation tries: every listed value, or both ends of a range (as floats where the
        range draws floats, so that a float range over an integer key is refused)."""
        if self.kind in ("uniform", "loguniform"):
            return [float(v) for v in self.values]
        return list(self.values)


@dataclass(frozen=True)
class Space:
    name: str
    path: str
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_accuracy"
    mode: str = "max"
    num_samples: int = 1
    seed: int = 0
    search: str = "random"
    scheduler: dict[str, Any] | None = None
    description: str = ""

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params.values() if p.kind == "grid")

    @property
    def num_trials(self) -> int:
        return self.grid_size * self.num_samples

    def param_space(self) -> dict[str, Any]:
        return {key: p.to_tune() for key, p in self.params.items()}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.description, "metric": self.metric, "mode": self.mode,
                               "num_samples": self.num_samples, "seed": self.seed, "search": self.search}
        if self.scheduler:
            out["scheduler"] = dict(self.scheduler)
        if self.fixed:
            out["set"] = dict(self.fixed)
        out["params"] = {k: {p.kind: list(p.values)} for k, p in self.params.items()}
        return out


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(f"{where}: expected a number, got {value!r}")
    return value


def _param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: expected one of {{{', '.join(NOTATIONS)}: ...}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in NOTATIONS:
        raise SpaceError(f"{where}: unknown notation {kind!r} (known: {', '.join(NOTATIONS)})")
    if not isinstance(values, list):
        raise SpaceError(f"{where}.{kind}: expected a list, got {values!r}")
    if kind in ("grid", "choice"):
        if not values:
            raise SpaceError(f"{where}.{kind}: empty {kind}: give at least one value")
        return Param(key, kind, tuple(values))
    if len(values) != 2:
        raise SpaceError(f"{where}.{kind}: expected [lo, hi], got {values!r}")
    lo, hi = (_number(v, f"{where}.{kind}") for v in values)
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise SpaceError(f"{where}.randint: bounds must be integers, got {values!r}")
        if lo > hi:
            raise SpaceError(f"{where}.randint: lo={lo} is above hi={hi}")
    elif lo >= hi:
        raise SpaceError(f"{where}.{kind}: lo={lo} must be below hi={hi}")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}.loguniform: bounds must be > 0, got {values!r}")
    return Param(key, kind, (lo, hi))


def parse_space(data: Any, name: str = "space", path: str = "") -> Space:
    """A ``Space`` from the YAML mapping of a space file; structure only (``validate_space`` checks keys)."""
    if not isinstance(data, dict):
        raise SpaceError(f"{name}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise SpaceError(f"{name}: unknown key {unknown[0]!r} (known: {', '.join(SPACE_KEYS)})")
    params_raw = data.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise SpaceError(f"{name}: 'params' must map config keys to a notation ({', '.join(NOTATIONS)})")
    params = {str(k): _param(str(k), v, f"{name}: params.{k}") for k, v in params_raw.items()}
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{name}: 'set' must map config keys to values")
    for key in [*params, *fixed]:
        if key in RESERVED:
            raise SpaceError(f"{name}: {key} is set by raysemi tune for each trial and cannot be tuned or set")
    both = sorted(set(params) & set(fixed))
    if both:
        raise SpaceError(f"{name}: {both[0]} is both tuned (params) and fixed (set)")
    metric = data.get("metric", "val_accuracy")
    if metric not in TRIAL_METRICS:
        hint = " (select on validation, never on test)" if str(metric).startswith("test") else ""
        raise SpaceError(f"{name}: metric {metric!r} is not reported by the trials after every round{hint}; "
                         f"use one of {', '.join(TRIAL_METRICS)}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise SpaceError(f"{name}: mode must be max or min, got {mode!r}")
    num_samples, seed = data.get("num_samples", 1), data.get("seed", 0)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SpaceError(f"{name}: num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpaceError(f"{name}: seed must be an integer, got {seed!r}")
    search = data.get("search", "random")
    if search not in ("random", "optuna"):
        raise SpaceError(f"{name}: search must be random or optuna, got {search!r}")
    if search == "optuna" and any(p.kind == "grid" for p in params.values()):
        raise SpaceError(f"{name}: search: optuna takes no grid: use choice instead")
    sched = data.get("scheduler")
    if sched is not None:
        sched = _scheduler_spec(sched, name)
    return Space(name, path, params, dict(fixed), metric, mode, num_samples, seed, search, sched,
                 str(data.get("description", "")))


def _scheduler_spec(sched: Any, name: str) -> dict[str, Any]:
    if not isinstance(sched, dict) or sched.get("name") != "asha":
        raise SpaceError(f"{name}: scheduler must be {{name: asha, ...}}, got {sched!r}")
    known = {"name", "grace_period", "reduction_factor", "max_t"}
    extra = sorted(set(sched) - known)
    if extra:
        raise SpaceError(f"{name}: scheduler: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
    out = {"name": "asha", "grace_period": sched.get("grace_period", 1),
           "reduction_factor": sched.get("reduction_factor", 2), "max_t": sched.get("max_t", "auto")}
    if not isinstance(out["grace_period"], int) or out["grace_period"] < 1:
        raise SpaceError(f"{name}: scheduler.grace_period must be an integer >= 1")
    if not isinstance(out["reduction_factor"], int | float) or out["reduction_factor"] <= 1:
        raise SpaceError(f"{name}: scheduler.reduction_factor must be > 1")
    if out["max_t"] != "auto" and (not isinstance(out["max_t"], int) or out["max_t"] < out["grace_period"]):
        raise SpaceError(f"{name}: scheduler.max_t must be 'auto' or an integer >= grace_period")
    return out


def load_space(path: str | Path) -> Space:
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"space file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"space file {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
    return parse_space(data, p.name, str(p))


def apply_fixed(cfg: Config, space: Space) -> Config:
    try:
        return cfg.replace(**space.fixed) if space.fixed else cfg
    except ConfigError as err:
        raise SpaceError(f"{space.name}: set: {err}") from None


def validate_space(space: Space, cfg: Config, overrides: dict[str, Any] | None = None) -> Config:
    """Check every key and listed value (and every grid/choice combination, up to 1,000) against the
    config; returns ``cfg`` with the space's ``set`` and then ``overrides`` (the command line's ``--set``,
    which wins over the space's) applied. Starts nothing."""
    base = apply_fixed(cfg, space)
    if overrides:
        tuned = sorted(set(overrides) & set(space.params))
        if tuned:
            raise SpaceError(f"{space.name}: {tuned[0]} is tuned by the space: it cannot also be --set")
        base = base.replace(**overrides)
    for key, p in space.params.items():
        for value in p.representatives():
            try:
                base.replace(**{key: value})
            except ConfigError as err:
                raise SpaceError(f"{space.name}: params.{key}: {err}") from None
    listed = [p for p in space.params.values() if p.kind in ("grid", "choice")]
    combos = math.prod(len(p.values) for p in listed)
    if len(listed) > 1 and combos <= 1000:
        for values in itertools.product(*(p.values for p in listed)):
            point = {p.key: v for p, v in zip(listed, values)}
            try:
                base.replace(**point)
            except ConfigError as err:
                raise SpaceError(f"{space.name}: the point {point} is not a valid config: {err}") from None
    return base


def _max_value(space: Space, cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    base = getattr(getattr(cfg, section), name)
    p = space.params.get(key)
    return max(p.representatives()) if p is not None else base


def max_reports(space: Space, cfg: Config) -> int:
    """Reports a trial makes at most: one per round (round 0 = fine-tuning) and the final one."""
    rounds = _max_value(space, cfg, "pseudolabel.rounds") if cfg.run.mode == "full" else 0
    return int(rounds) + 2


def tune_config(space: Space, cfg: Config, max_concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = None
    if space.scheduler:
        s = space.scheduler
        max_t = max_reports(space, cfg) if s["max_t"] == "auto" else s["max_t"]
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=min(s["grace_period"], max_t), reduction_factor=s["reduction_factor"])
    if space.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise SpaceError(f"{space.name}: search: optuna needs optuna (pip install optuna)")
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=space.seed), max_concurrent  # Tune adds a ConcurrencyLimiter
    else:  # Tune ignores max_concurrent_trials for a BasicVariantGenerator: the generator limits itself
        search_alg, limit = BasicVariantGenerator(max_concurrent=max_concurrent, random_state=space.seed), None
    return tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=space.num_samples, max_concurrent_trials=limit,
                           trial_dirname_creator=_trial_dirname)


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ---------------------------------------------------------------- resources


def trial_needs(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs the stages of one trial hold at once (they run one after another): the Train workers,
    the pseudo-label actors or the evaluation task; the trial's own ``TRIAL_CPU`` is not included."""
    r, pl = cfg.ray, cfg.pseudolabel
    cpu = max(r.num_workers * r.cpus_per_worker, pl.num_actors * pl.cpus_per_actor, r.cpus_per_worker)
    gpu = max(r.num_workers * (1 if r.use_gpu else 0), pl.num_actors * pl.gpus_per_actor)
    return {"CPU": cpu, "GPU": gpu}


def max_concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """Trials whose biggest stages fit side by side. On CPUs each trial's own ``TRIAL_CPU`` counts too:
    two trials of 1-CPU workers do not fit 2 CPUs (the second worker group waits for 1 of the 0.98 left),
    which is why the CPU spaces ask 0.99 CPU per worker."""
    need = trial_needs(cfg)
    if need["GPU"] > 0:
        return max(1, int(cluster.get("GPU", 0) // need["GPU"]))
    return max(1, int((cluster.get("CPU", 0) + 1e-9) // (need["CPU"] + TRIAL_CPU)))


# ---------------------------------------------------------------- the trial


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, list | tuple | str) else value


def trial_dir(exp: str, trial_id: str) -> str:
    return join(exp, "trials", trial_id)


def _report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, STATE).write_text(json.dumps(state))
        tune.report({k: v for k, v in metrics.items() if v is not None},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def _maybe_fail(spec: str | None, trial_id: str, round_: int) -> None:
    """Test hook (``TUNE_FAULT_ENV``): the trial process dies once after reporting ``round_``."""
    if not spec:
        return
    index, at_round, marker = spec.split(":", 2)
    if int(trial_id.rsplit("_", 1)[-1]) != int(index) or int(at_round) != round_ or os.path.exists(marker):
        return
    Path(marker).write_text(f"killed trial {trial_id} after round {round_}\n")
    log.warning("injected failure: trial %s dies after round %d", trial_id, round_)
    os._exit(1)


class PipelineRunner:
    """Runs a trial's pipeline in its own actor, outside the trial's placement group: Tune places a trial in
    a placement group that captures its child tasks, and the stages' tasks and actor pools (which reserve
    their own CPUs/GPUs) fit neither its 0.01-CPU bundle nor should they hold it. The trial polls ``events``.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def run(self, cfg: dict[str, Any], config_path: str) -> str:
        from raysemi.pipeline import run_pipeline

        return run_pipeline(from_dict(cfg), resume=True, config_path=config_path, on_round=self.events.append)

    def take(self, since: int) -> list[dict[str, Any]]:
        return self.events[since:]


def _run_pipeline_outside(cfg: Config, config_path: str, on_round) -> str:
    """``run_pipeline(cfg, resume=True)`` in a ``PipelineRunner`` on this node; ``on_round`` runs here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    runner = ray.remote(PipelineRunner).options(num_cpus=0, max_concurrency=2, scheduling_strategy=here).remote()
    try:
        done_ref = runner.run.remote(cfg.to_dict(), config_path)
        seen = 0
        while True:
            ready, _ = ray.wait([done_ref], timeout=1.0)
            for event in ray.get(runner.take.remote(seen)):
                seen += 1
                on_round(event)
            if ready:
                return ray.get(done_ref)
    finally:
        ray.kill(runner)


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: the pipeline with the sampled values, reporting after every round and at the end."""
    from ray import tune

    from raysemi.io import read_json

    t0 = time.time()
    trial_id = tune.get_context().get_trial_id()
    values = {k: _plain(v) for k, v in config.items()}
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

    def on_round(summary: dict[str, Any]) -> None:
        if summary["round"] in done:  # reported before this trial was restored
            return
        state["rounds"].append(summary)
        state["elapsed_s"] = elapsed0 + time.time() - t0
        # The best round so far by the run's own rule (run.select_metric), as the pipeline will pick it.
        best = max(state["rounds"], key=lambda s: (s.get("val_selected", s["val_accuracy"]), -s["round"]))
        _report({"round": summary["round"], "round_val_accuracy": summary["val_accuracy"],
                 "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
                 "val_balanced_accuracy": best.get("val_balanced_accuracy"),
                 "best_round": best["round"], "n_pseudo": summary["n_pseudo"],
                 "pretrain_reused": summary["pretrain_reused"], "wall_s": state["elapsed_s"], "completed": False},
                state)
        _maybe_fail(setup.get("fault"), trial_id, summary["round"])

    report = read_json(_run_pipeline_outside(cfg, setup.get("config_path", ""), on_round))
    best = report["best_round"]
    val = report["rounds"][best]["val"]
    state["elapsed_s"] = elapsed0 + time.time() - t0
    _report({"round": report["rounds"][-1]["round"], "round_val_accuracy": report["rounds"][-1]["val"]["accuracy"],
             "val_accuracy": val["accuracy"], "val_macro_f1": val.get("macro_f1"),
             "val_balanced_accuracy": val.get("balanced_accuracy"), "best_round": best,
             "test_accuracy": report["test"]["accuracy"], "test_macro_f1": report["test"].get("macro_f1"),
             "pretrain_reused": bool(report["run"].get("pretrain_reused")),
             "pretrain_s": report["stages"].get("pretrain"), "wall_s": state["elapsed_s"],
             "attempts": state["attempts"], "completed": True}, state)


# ---------------------------------------------------------------- the experiment


@dataclass
class TuneSummary:
    exp: str  # the experiment folder (local or s3://)
    rows: list[dict[str, Any]]  # one per trial, see ``collect_rows``
    best: dict[str, Any] | None  # the best completed row
    files: dict[str, str]  # kind -> URI (csv, md, heatmap, best_config)
    interrupted: bool  # some trials unfinished: resume with --resume
    text: str  # what ``raysemi tune`` prints


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else str(Path(uri).expanduser().resolve())


def prepare_base(cfg: Config, space: Space, out: str, use_cache: bool,
                 overrides: dict[str, Any] | None = None) -> Config:
    """The config every trial starts from: validated, the space's ``set`` and then ``overrides`` applied,
    local paths made absolute (Tune runs trials in other working directories) and the pretraining cache on
    ``<out>/pretrain_cache``."""
    base = absolute_paths(validate_space(space, cfg, overrides))
    cache = base.pretrain.cache or join(out, "pretrain_cache")
    return base.replace(**{"pretrain.cache": _absolute(cache) if use_cache else None})


def preflight(space: Space, base: Config) -> None:
    """What would fail every trial, found before any trial starts: the dataset, the backbone, the budget."""
    from raysemi.data.labels import label_split
    from raysemi.pipeline import check_dataset
    from raysemi.stages import pretrain
    from raysemi.stages.selection import check_budget

    check_dataset(base)
    if base.run.mode != "supervised":
        pretrain.check_inputs(base)
    if base.run.mode == "full":
        rounds = _max_value(space, base, "pseudolabel.rounds")
        if rounds:
            pool = len(label_split(base.data.path, base.data).pool_ids)
            check_budget(_max_value(space, base, "pseudolabel.budget") * rounds, pool)


def _experiment_exists(exp: str, fs_path: str, storage_fs) -> bool:
    from ray.tune import Tuner

    fs, setup = filesystem(join(exp, SETUP))
    return fs.exists(setup) or Tuner.can_restore(fs_path, storage_filesystem=storage_fs)


def run_tune(
    cfg: Config | None,
    space_path: str | None,
    *,
    name: str | None = None,
    out: str = "outputs/tune",
    resume: bool = False,
    overwrite: bool = False,
    use_cache: bool = True,
    config_path: str = "",
    overrides: dict[str, Any] | None = None,
    max_concurrent: int | None = None,
    callbacks: Sequence[Any] | None = None,
) -> TuneSummary:
    """Run (or ``resume``) the experiment ``<out>/<name>`` over the space in ``space_path``; every problem
    with the inputs is raised before any trial starts. ``overrides`` (dotted keys, the command line's
    ``--set``) win over the space's ``set``; ``callbacks`` are extra Ray Tune callbacks."""
    from raysemi import ray_utils

    out = _absolute(out)
    if name is None:
        if space_path is None:
            raise RaysemiError("give --space (or, with --resume, the experiment's --name)")
        name = Path(space_path).stem
    exp = join(out, name)
    storage_path, storage_fs = ray_utils.storage_for(out)
    exp_fs_path = f"{storage_path.rstrip('/')}/{name}"
    exists = _experiment_exists(exp, exp_fs_path, storage_fs)
    if resume:
        if not exists:
            raise RaysemiError(f"--resume: {exp} holds no tune experiment (run without --resume to start one)")
        fs, path = filesystem(join(exp, SETUP))
        with fs.open(path, "rb") as fh:
            setup = json.loads(fh.read())
        space = parse_space(setup["space"], Path(setup.get("space_path") or name).name, setup.get("space_path", ""))
        if cfg is not None or space_path is not None:
            given = load_space(space_path) if space_path is not None else space
            if given.to_dict() != space.to_dict():
                raise RaysemiError(f"--resume: {space_path} differs from the space of {exp}: resume without --space")
            if cfg is not None:
                mine = prepare_base(cfg, given, out, use_cache, overrides).to_dict()
                theirs = dict(setup["base"])
                mine["ray"].pop("address"), theirs["ray"].pop("address", None)
                if mine != theirs:
                    raise RaysemiError(f"--resume: the config differs from the one {exp} was started with: "
                                       "resume without --config/--set, or start a new --name")
    else:
        if space_path is None:
            raise RaysemiError("give the search space: --space tune_spaces/NAME.yaml")
        if exists and not overwrite:
            raise RaysemiError(f"{exp} holds an earlier tune experiment: pass --resume to continue it "
                               "or --overwrite to replace it")
        space = load_space(space_path)
        base = prepare_base(cfg if cfg is not None else load_config(None), space, out, use_cache, overrides)
        preflight(space, base)
        if exists:
            fs, path = filesystem(exp)
            fs.rm(path, recursive=True)
        setup = {"base": base.to_dict(), "space": space.to_dict(), "space_path": str(space_path), "name": name,
                 "exp": exp, "config_path": config_path,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    base = from_dict(setup["base"])

    from ray import tune

    ray_utils.init_ray(base.ray.address)
    import ray

    n = max_concurrent or max_concurrent_trials(base, ray.cluster_resources())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup={**setup, "fault": os.environ.get(TUNE_FAULT_ENV)}),
        {"CPU": TRIAL_CPU},
    )
    if resume:
        log.info("resuming %s: finished trials are kept, unfinished and errored ones go on", exp)
        tuner = tune.Tuner.restore(exp_fs_path if storage_fs is not None else exp, trainable=trainable,
                                   resume_unfinished=True, restart_errored=True, storage_filesystem=storage_fs)
    else:
        write_bytes_atomic(join(exp, SETUP), json.dumps(setup, indent=2).encode())
        log.info("%s: %d trials, at most %d at a time (a trial needs %s)", name, space.num_trials, n,
                 trial_needs(base))
        tuner = tune.Tuner(
            trainable, param_space=space.param_space(), tune_config=tune_config(space, base, n),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=base.ray.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=list(callbacks or []),
            ),
        )
    tuner.fit()
    # Statuses as saved: after an interruption the in-memory trials all read TERMINATED, the saved RUNNING.
    analysis = tune.ExperimentAnalysis(exp_fs_path if storage_fs is not None else exp, storage_filesystem=storage_fs)
    rows = collect_rows(analysis.trials, space, base)
    return write_outputs(exp, name, space, base, rows)


# ---------------------------------------------------------------- results


def collect_rows(trials, space: Space, base: Config) -> list[dict[str, Any]]:
    """One row per trial: id, status, sampled values, accuracies, time, whether its pretraining was reused."""
    from raysemi.pretrain_cache import cache_key, lookup, manifest_sha256

    manifest_sha = manifest_sha256(base.data.path)
    costs: dict[str, float | None] = {}
    rows = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        m = t.last_result or {}
        values = {k: _plain(t.config.get(k)) for k in space.params}
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
    done = [r for r in rows if r["status"] == "completed" and r["metric"] is not None]
    if not done:
        return None
    sign = 1 if space.mode == "max" else -1
    return max(done, key=lambda r: sign * r["metric"])  # rows come sorted by trial id: ties go to the first


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


# wall_s: the trial's wall time (all attempts); pretrain_s: its time in the pretraining stage, waiting for
# another trial's pretraining included; pretrain_cost_s: what computing that pretraining took.
COLUMNS = ("status", "val_accuracy", "test_accuracy", "best_round", "wall_s", "pretrain_s", "pretrain_reused",
           "pretrain_cost_s", "pretrain_key", "failures")


def results_csv(rows: list[dict[str, Any]], space: Space) -> bytes:
    buf = io.StringIO()
    cols = ["trial_id", *space.params, *COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return buf.getvalue().encode()


def pretrain_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    known = [r for r in rows if r["pretrain_reused"] is not None]
    return {"trials": len(rows), "pretrained": len(known),
            "reused": sum(1 for r in known if r["pretrain_reused"]),
            "computed": sum(1 for r in known if not r["pretrain_reused"]),
            "distinct": len({r["pretrain_key"] for r in rows if r["pretrain_key"]})}


def results_markdown(rows: list[dict[str, Any]], space: Space, name: str, best: dict[str, Any] | None,
                     heatmap: bool) -> str:
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
        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(r.get(col)) for col in cols) + " |" for r in ordered]
    lines.append("")
    if best is not None:
        picked = ", ".join(f"{k}={_fmt(best[k])}" for k in space.params)
        lines.append(f"Best trial: **{best['trial_id']}** ({picked}): validation accuracy "
                     f"{_fmt(best['val_accuracy'])}, test accuracy {_fmt(best['test_accuracy'])}; "
                     f"config in `{FILES['best_config']}`.")
    else:
        lines.append("No trial completed: no best configuration yet.")
    if heatmap:
        lines += ["", f"![test accuracy over pretraining epochs x learning rate]({FILES['heatmap']})"]
    return "\n".join(lines) + "\n"


def _axis_value(row: dict[str, Any], key: str, base: Config) -> Any:
    if key in row:
        return row[key]
    section, name = key.split(".")
    return getattr(getattr(base, section), name)


def heatmap_png(rows: list[dict[str, Any]], base: Config, title: str) -> bytes | None:
    """Test accuracy over pretraining epochs x lr (the paper's Table 1): per cell the trial with the best
    validation accuracy; under each epoch count the mean computation time of its distinct pretrainings."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "completed" and r["test_accuracy"] is not None]
    if not done:
        return None
    ex, ey = HEATMAP_AXES
    xs = sorted({_axis_value(r, ex, base) for r in done})
    ys = sorted({_axis_value(r, ey, base) for r in done}, reverse=True)
    if len(xs) > MAX_HEATMAP_VALUES or len(ys) > MAX_HEATMAP_VALUES:
        return None
    acc = np.full((len(ys), len(xs)), np.nan)
    val = np.full_like(acc, np.nan)
    for r in done:
        i, j = ys.index(_axis_value(r, ey, base)), xs.index(_axis_value(r, ex, base))
        if np.isnan(val[i, j]) or r["val_accuracy"] > val[i, j]:
            val[i, j], acc[i, j] = r["val_accuracy"], r["test_accuracy"]
    fig = Figure(figsize=(1.8 + 1.6 * len(xs), 1.4 + 0.9 * len(ys)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="test accuracy")
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        text = "n/a" if np.isnan(acc[i, j]) else f"{acc[i, j]:.3f}\n(val {val[i, j]:.3f})"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if np.isnan(acc[i, j]) or acc[i, j] > np.nanmean(acc) else "white")
    labels = []
    for x in xs:
        costs = {r["pretrain_key"]: r["pretrain_cost_s"] for r in done
                 if _axis_value(r, ex, base) == x and r["pretrain_cost_s"] is not None}
        labels.append(f"{x}\n{np.mean(list(costs.values())) / 60:.1f} min" if costs else str(x))
    ax.set_xticks(range(len(xs)), labels)
    ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
    ax.set_xlabel(f"{ex} (mean pretraining time)")
    ax.set_ylabel(ey)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def best_config_yaml(exp: str, name: str, best: dict[str, Any]) -> str:
    """The resolved config of the best trial, ready for ``raysemi run --config`` (output in <exp>/best_run)."""

    cfg = rio.read_config_beside(trial_dir(exp, best["trial_id"]))
    cfg = cfg.replace(**{"run.output_dir": join(exp, "best_run"), "run.name": f"{name}-best"})
    head = (f"# Best trial of tune experiment {name}: {best['trial_id']} (validation accuracy "
            f"{_fmt(best['val_accuracy'])}, test accuracy {_fmt(best['test_accuracy'])}).\n"
            f"# Re-run it with: raysemi run --config best_config.yaml\n")
    return head + config_to_yaml(cfg)


def write_outputs(exp: str, name: str, space: Space, base: Config, rows: list[dict[str, Any]]) -> TuneSummary:
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
