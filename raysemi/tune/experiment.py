"""``raysemi tune``: a Ray Tune experiment whose every trial is one ``run_pipeline`` with sampled values.

The experiment lives in ``<out>/<name>/``: ``raysemi_tune.json`` (the base config and the space it started
with, so that ``--resume`` needs neither), Tune's own state, ``trials/<trial id>/`` (each trial's run) and
the results (``tune.results``). Every problem with the inputs is raised before any trial starts
(``preflight``). ``max_concurrent_trials`` = the cluster's GPUs (CPUs without GPUs) over what one trial's
stages need (``tune.search``). Pretrainings go through the content-addressed cache
(``raysemi.pipeline.pretrain_cache``, ``<out>/pretrain_cache`` unless ``pretrain.cache`` says otherwise).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raysemi.core.config import Config, absolute_paths, from_dict, load_config
from raysemi.core.errors import RaysemiError
from raysemi.core.io import absolute, filesystem, join, write_bytes_atomic
from raysemi.core.outputs import TUNE, check_marked, guard_output, mark, remove_output
from raysemi.tune.results import TuneSummary, collect_rows, write_outputs
from raysemi.tune.search import TRIAL_CPU, max_concurrent_trials, trial_needs, tune_config
from raysemi.tune.space import Space, load_space, max_value, parse_space, validate_space
from raysemi.tune.trial import run_trial

log = logging.getLogger("raysemi.tune")

SETUP = "raysemi_tune.json"


def prepare_base(cfg: Config, space: Space, out: str, use_cache: bool,
                 overrides: dict[str, Any] | None = None) -> Config:
    """The config every trial starts from: validated, the space's ``set`` and then ``overrides`` applied,
    local paths made absolute (Tune runs trials in other working directories) and the pretraining cache on
    ``<out>/pretrain_cache``."""
    base = absolute_paths(validate_space(space, cfg, overrides))
    cache = base.pretrain.cache or join(out, "pretrain_cache")
    return base.replace(**{"pretrain.cache": absolute(cache) if use_cache else None})


def preflight(space: Space, base: Config) -> None:
    """What would fail every trial, found before any trial starts: the dataset, the backbone, the budget."""
    from raysemi.data.labels import pool_rows
    from raysemi.pipeline.run import check_dataset
    from raysemi.stages import pretrain
    from raysemi.stages.selection import check_budget

    manifest = check_dataset(base)
    if base.run.mode != "supervised":
        pretrain.check_inputs(base)
    if base.run.mode == "full":
        rounds = max_value(space, base, "pseudolabel.rounds")
        if rounds:
            pool = pool_rows(base.data.path, manifest, base.data)
            check_budget(max_value(space, base, "pseudolabel.budget") * rounds, pool)


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
    from raysemi.distributed import ray_session, ray_utils

    out = absolute(out)
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
        guard_output(exp, "an earlier tune experiment", exists, resume=False, overwrite=overwrite)
        if exists:  # refused before any work when raysemi cannot tell the folder is its own
            check_marked(exp, TUNE, "an earlier tune experiment")
        space = load_space(space_path)
        base = prepare_base(cfg if cfg is not None else load_config(None), space, out, use_cache, overrides)
        preflight(space, base)
        if exists:  # --overwrite, and only once the inputs are known good: bad input keeps the old experiment
            remove_output(exp, TUNE, "an earlier tune experiment")
        setup = {"base": base.to_dict(), "space": space.to_dict(), "space_path": str(space_path), "name": name,
                 "exp": exp, "config_path": config_path,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    base = from_dict(setup["base"])

    from ray import tune

    ray_session.init_ray(base.ray.address)
    import ray

    n = max_concurrent or max_concurrent_trials(base, ray.cluster_resources())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"CPU": TRIAL_CPU},
    )
    if resume:
        log.info("resuming %s: finished trials are kept, unfinished and errored ones go on", exp)
        tuner = tune.Tuner.restore(exp_fs_path if storage_fs is not None else exp, trainable=trainable,
                                   resume_unfinished=True, restart_errored=True, storage_filesystem=storage_fs)
    else:
        mark(exp, TUNE)
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

