"""One frozen configuration tree for every raysemi command.

Loaded from YAML (any subset of keys; the rest are the defaults of :mod:`raysemi.core.config_sections`)
with dotted overrides (``--set pretrain.epochs=50``). Validated by pydantic; unknown keys, values of the
wrong type or out of bounds are refused as one ``ConfigError`` line naming the dotted key, once, before
any work starts. The resolved tree is dumped next to every output
(``config.yaml``) so that a result always names what produced it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from raysemi.core.config_sections import (
    SECTION,
    AugmentConfig,
    DataConfig,
    FinetuneConfig,
    FixMatchConfig,
    ModelConfig,
    PretrainConfig,
    PseudoLabelConfig,
    RayConfig,
    RunConfig,
)
from raysemi.core.errors import RaysemiError

__all__ = [
    "PATH_KEYS",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "FixMatchConfig",
    "ModelConfig",
    "PretrainConfig",
    "PseudoLabelConfig",
    "RayConfig",
    "RunConfig",
    "absolute_paths",
    "apply_overrides",
    "config_from_yaml",
    "config_to_yaml",
    "from_dict",
    "load_config",
    "parse_override",
]


class ConfigError(RaysemiError):
    """A configuration problem, reported as one line naming the key."""


@dataclass(frozen=True, config=SECTION)
class Config:
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    pseudolabel: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    fixmatch: FixMatchConfig = Field(default_factory=FixMatchConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _across_fields(self) -> Config:
        """What one field's type and bounds cannot say; a ConfigError (a ValueError) here reaches the caller
        as it is (``_config_error``)."""
        d, m, pl, r = self.data, self.model, self.pseudolabel, self.ray
        if d.label_fraction is not None and d.labels_per_class is not None:
            raise ConfigError("data.label_fraction and data.labels_per_class: set at most one")
        for stage, s in (("pretrain", self.pretrain), ("finetune", self.finetune)):
            if s.warmup_epochs > s.epochs:
                raise ConfigError(
                    f"{stage}.warmup_epochs: {s.warmup_epochs} is outside [0, {stage}.epochs={s.epochs}]")
            if s.batch_size < r.num_workers:  # each worker gets a share of the global batch
                raise ConfigError(
                    f"{stage}.batch_size: {s.batch_size} is smaller than ray.num_workers ({r.num_workers})")
        if not (pl.cpus_per_actor > 0 or pl.gpus_per_actor > 0):
            raise ConfigError("pseudolabel: an actor needs CPUs or GPUs (cpus_per_actor or gpus_per_actor > 0)")
        if r.min_workers is not None and r.min_workers > r.num_workers:
            raise ConfigError(
                f"ray.min_workers: {r.min_workers} is not between 1 and ray.num_workers ({r.num_workers})")
        # PyTorch's SyncBatchNorm runs on CUDA only; on CPU workers each rank normalises its own half-batch.
        if m.sync_batchnorm and not r.use_gpu:
            raise ConfigError("model.sync_batchnorm: needs ray.use_gpu=true (CUDA only)")
        if self.fixmatch.ema_teacher and self.finetune.ema_decay <= 0:
            raise ConfigError("fixmatch.ema_teacher: needs finetune.ema_decay > 0 (the EMA is the teacher)")
        return self

    def replace(self, **dotted: Any) -> Config:
        """A validated copy with dotted keys replaced: ``cfg.replace(**{"pretrain.epochs": 5})``."""
        return apply_overrides(self, dotted)

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain YAML-able values (tuples as lists)."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


_ADAPTER = TypeAdapter(Config)
_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true/false",
               "string_type": "a string", "dataclass_type": "a mapping"}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _dotted(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _unwrap(tp: Any, meta: list[Any]) -> Any:
    """``X | None`` -> ``X``, ``Annotated[X, ...]`` -> ``X`` with its constraints added to ``meta``."""
    while True:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        elif typing.get_origin(tp) is Annotated:
            for m in tp.__metadata__:
                meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
            tp = tp.__origin__
        else:
            return tp


def _schema_at(loc: tuple[Any, ...]) -> tuple[Any, list[Any], FieldInfo | None]:
    """The type, constraints and field at a pydantic error location in the tree ((None, [], None) if none)."""
    tp: Any = Config
    meta: list[Any] = []
    info: FieldInfo | None = None
    for part in loc:
        tp = _unwrap(tp, meta)
        if isinstance(part, int):
            args = typing.get_args(tp)
            if part >= len(args):
                return None, [], None
            tp, meta, info = args[part], [], None
        else:
            fields = getattr(tp, "__pydantic_fields__", {})
            if part not in fields:
                return None, [], None
            info = fields[part]
            tp, meta = info.annotation, list(info.metadata)
    return _unwrap(tp, meta), meta, info


def _bounds(loc: tuple[Any, ...], ctx: dict[str, Any]) -> str:
    """``must be in [0, 1)`` / ``must be >= 1`` from every bound of the field (pydantic names only the one broken)."""
    _, meta, info = _schema_at(loc)
    found = {name: getattr(m, name) for m in meta for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    found = found or dict(ctx)
    lo = next((f"{'[' if n == 'ge' else '('}{found[n]}" for n in ("ge", "gt") if n in found), None)
    hi = next((f"{found[n]}{']' if n == 'le' else ')'}" for n in ("le", "lt") if n in found), None)
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    text = f"must be in {lo}, {hi}" if lo and hi else " and ".join(f"must be {ops[n]} {v}" for n, v in found.items())
    # A field's description, where it has one, is the hint that goes with its bound ("0 = off").
    return f"{text} ({info.description})" if info is not None and info.description else text


def _config_error(err: ValidationError) -> ConfigError:
    """The one translation of pydantic's errors: the first one, as a line naming its dotted key."""
    first = err.errors(include_url=False)[0]
    kind, loc, value, ctx = first["type"], tuple(first["loc"]), first.get("input"), first.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):  # raised by Config._across_fields, already worded
        return ctx["error"]
    key = _dotted(loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        known = sorted(getattr(_schema_at(loc[:-1])[0], "__pydantic_fields__", {}))
        return ConfigError(f"unknown config key {'.'.join(map(str, loc))} (known: {', '.join(known)})")
    if kind in _TYPE_NAMES:
        message = f"expected {_TYPE_NAMES[kind]}, got {value!r}"
    elif kind == "literal_error":
        message = f"{value!r} is not one of {ctx['expected']}"
    elif kind in _BOUNDS:
        message = f"{_bounds(loc, ctx)} (got {value!r})"
    else:  # our own PydanticCustomErrors (config_sections) and anything unforeseen: pydantic's line
        message = first["msg"]
    return ConfigError(f"{key or 'config'}: {message}".splitlines()[0])


def from_dict(data: dict[str, Any] | None) -> Config:
    """A validated Config from a (partial) mapping; the rest are the defaults."""
    try:
        return _ADAPTER.validate_python(data or {})
    except ValidationError as err:
        raise _config_error(err) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"pretrain.epochs=50"`` -> ``("pretrain.epochs", 50)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys replaced, validated as a whole."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"unknown config key {key}")
        node[parts[-1]] = value
    return from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
    cfg = from_dict(data)
    if overrides:
        cfg = apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    return cfg


PATH_KEYS = ("data.path", "run.output_dir", "ray.storage_path", "pretrain.cache")


def absolute_paths(cfg: Config) -> Config:
    """Local paths of ``PATH_KEYS`` made absolute against the current directory (URIs and None as they are):
    Ray's workers and actors do not run in the command's directory, so a relative path would miss there."""
    changes = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and not os.path.isabs(value):
            changes[key] = os.path.abspath(os.path.expanduser(value))
    return cfg.replace(**changes) if changes else cfg


def config_to_yaml(cfg: Config) -> str:
    """The resolved tree as YAML, every key in the order of the sections."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_yaml(text: str) -> Config:
    """The inverse of ``config_to_yaml``, validated."""
    return from_dict(yaml.safe_load(text) or {})
