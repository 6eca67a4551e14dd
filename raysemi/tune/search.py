"""How Tune searches: the search algorithm and scheduler of a space, and how many trials fit at once.

A trial is a function trial of ``TRIAL_CPU`` (Ray Train V2's ``Tuner(driver_fn)`` pattern); its stages
reserve their own workers, so the concurrency is the cluster over what one trial's biggest stage holds.
"""

from __future__ import annotations

import importlib.util

from raysemi.core.config import Config
from raysemi.tune.space import Space, SpaceError, max_reports

TRIAL_CPU = 0.01  # the trial (driver) itself; its stages reserve their own workers


def tune_config(space: Space, cfg: Config, max_concurrent: int):
    """The ``TuneConfig`` of a space: its metric, search algorithm (random or Optuna), ASHA when asked."""
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

