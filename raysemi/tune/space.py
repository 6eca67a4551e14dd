"""Search spaces: the YAML notation of ``tune_spaces/*.yaml``, parsed and checked against the config.

Any dotted config key takes one notation, translated to ``ray.tune`` in one place (``Param.to_tune``)::

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
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysemi.core.config import Config, ConfigError
from raysemi.core.errors import RaysemiError

NOTATIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TRIAL_METRICS = ("val_accuracy", "round_val_accuracy", "val_macro_f1", "val_balanced_accuracy")  # in every report of every trial
RESERVED = ("run.output_dir", "run.name", "pretrain.cache")  # set per trial by raysemi tune
SPACE_KEYS = ("description", "metric", "mode", "num_samples", "seed", "search", "scheduler", "set", "params")


class SpaceError(RaysemiError):
    """A search space that cannot be used, said in one line naming the file and key."""



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


def max_value(space: Space, cfg: Config, key: str) -> Any:
    """The largest value ``key`` takes in the space (its config value when not tuned)."""
    section, name = key.split(".")
    base = getattr(getattr(cfg, section), name)
    p = space.params.get(key)
    return max(p.representatives()) if p is not None else base


def max_reports(space: Space, cfg: Config) -> int:
    """Reports a trial makes at most: one per round (round 0 = fine-tuning) and the final one."""
    rounds = max_value(space, cfg, "pseudolabel.rounds") if cfg.run.mode == "full" else 0
    return int(rounds) + 2


