"""One frozen configuration tree for every raysemi command.

Loaded from YAML (any subset of keys; the rest are the defaults below) with dotted overrides
(``--set pretrain.epochs=50``). Unknown keys and values of the wrong type are refused with the key's
dotted name, once, before any work starts. The resolved tree is dumped next to every output
(``config.yaml``) so that a result always names what produced it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raysemi.core.config_checks import (  # ConfigError: imported from here by every caller
    ConfigError,
    validate,
)


@dataclass(frozen=True)
class DataConfig:
    path: str = "outputs/demo/dataset"  # dataset URI: local folder or s3://bucket/prefix
    image_size: int = 64  # training resolution (square)
    loader: Literal["auto", "dali", "torch"] = "auto"  # auto = DALI wherever it imports
    num_threads: int = 2  # decode threads per worker (DALI) / DataLoader workers (torch)
    # torch loader: each training image decoded once per run, its pixels kept up to this many MB per
    # loader (raysemi.data.loading.decoded_cache); 0 = decode every epoch
    decode_cache_mb: int = 2048
    # "Few labels" on a fully labeled set: keep a deterministic subset (by id hash) of train labels.
    label_fraction: float | None = None
    labels_per_class: int | None = None
    label_seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """BYOL's asymmetric two-view recipe (Grill et al. 2020, Table 6); greyscale-friendly defaults."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.0  # 0.1 in the paper; hue carries no information in greyscale radiographs
    grey_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # view 1, view 2
    solarize_p: tuple[float, float] = (0.0, 0.2)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Fine-tuning's (single-view) augmentation; not part of the pretraining cache key.
    # "light": crop + flip (the method paper's); "trivialaugment": + torchvision's TrivialAugmentWide
    # (Mueller & Hutter 2021); "randaugment": + RandAugment(2, 9) (Cubuk et al. 2020).
    finetune_policy: Literal["light", "trivialaugment", "randaugment"] = "trivialaugment"
    finetune_crop_scale: tuple[float, float] = (0.35, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    small_image: bool = True  # 3x3 stem, no max-pool: for 28-64 px inputs
    proj_hidden_dim: int = 4096  # BYOL paper defaults
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    head: Literal["projector", "encoder"] = "projector"  # paper: classifier on the projector output
    sync_batchnorm: bool = False


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global, split across workers
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.2  # base lr per 256 images, scaled linearly with the global batch (BYOL: 0.2 x B/256)
    weight_decay: float = 1.5e-6
    warmup_epochs: int = 10
    tau_base: float = 0.99
    # auto = bf16 autocast where the device has bf16 units (GPU; CPU with AMX / AVX512-BF16), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC: faster on GPUs and on the CPUs measured (bench/pretrain.py)
    compile: bool = False  # torch.compile the networks (pays only in long runs: bench/pretrain.py)
    checkpoint_every: int = 1  # epochs
    knn_every: int = 5  # epochs; 0 disables the kNN monitor
    knn_k: int = 20
    seed: int = 0
    cache: str | None = None  # URI of the content-addressed pretraining cache (raysemi.pipeline.pretrain_cache); None = off


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning and every retraining round. Training length is counted in optimizer steps (``steps``),
    the same for every round and every baseline whatever the size of its training set; ``steps: null``
    falls back to ``epochs`` passes over the training set (the method paper's way)."""

    steps: int | None = 600  # optimizer steps per round; null = epochs x steps per epoch
    epochs: int = 30  # used only when steps is null
    eval_every: int = 100  # steps between validations/reports when counting in steps
    batch_size: int = 64
    optimizer: Literal["lars", "sgd", "adamw"] = "adamw"
    lr: float = 0.001  # peak lr, not scaled
    weight_decay: float = 0.05
    warmup_steps: int = 50  # when counting in steps (at most the steps: a shorter run warms up throughout)
    warmup_epochs: int = 0  # when counting in epochs
    freeze_backbone: bool = False  # True = linear probe
    # lr of the pretrained parts (backbone, projector) relative to the head's: < 1 keeps more of what
    # pretraining learnt (discriminative fine-tuning, Howard & Ruder 2018). 1 = one lr for all (the paper's).
    backbone_lr_scale: float = 1.0
    class_weighting: bool = True  # inverse-frequency class weights in the loss (labelled + pseudo rows)
    pseudo_weight: float = 1.0  # loss weight of a pseudo-labeled row relative to a true label
    label_smoothing: float = 0.1
    ema_decay: float = 0.998  # EMA of the weights (timm ModelEmaV3, warmed up); 0 = off. The EMA model is
    #                           validated, exported and labels the pool
    dropout: float = 0.0  # before the classifier head (Noisy Student's student noise)
    drop_path_rate: float = 0.1  # stochastic depth where the timm backbone has it (student noise)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # also inference: validation, pseudo-labels
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = 5  # epochs (with steps: evaluation intervals)
    seed: int = 0


@dataclass(frozen=True)
class PseudoLabelConfig:
    rounds: int = 2
    # Pseudo-labels added per round (cumulative: round r uses the r x budget most confident). A value
    # <= 1 is a fraction of the unlabelled pool (0.2 = a fifth of it), a larger one a count of images.
    budget: float = 0.25
    # How the budget is shared among the predicted classes: "top" = most confident overall (the method
    # paper's), "balanced" = equal shares, "prior" = shares in proportion to the labelled class counts.
    selection: Literal["top", "balanced", "prior"] = "prior"
    # Share of each round's training rows that are true labels, reached by repeating them (0 = no
    # repetition): at equal steps per round, pseudo-labels would otherwise crowd the true labels out.
    labeled_share: float = 0.0
    soft_targets: bool = False  # train on the teacher's probabilities (Noisy Student) instead of argmax
    temperature: float = 1.0  # soft targets: p^(1/T), renormalised; < 1 sharpens
    min_confidence: float = 0.0
    num_actors: int = 2
    batch_size: int = 256
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    retrain_from: Literal["pretrained", "previous"] = "pretrained"
    # Rounds >= 1 train at finetune.lr times this: with retrain_from "previous", < 1 continues the teacher
    # gently instead of training it again at full strength.
    retrain_lr_scale: float = 1.0


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: attach to a running cluster if there is one, else start a local Ray
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Ray Train's checkpoints; None = <run.output_dir>/ray. Must be shared by all nodes (s3://) on a cluster.
    storage_path: str | None = None
    max_failures: int = 2
    # How the Train workers (their placement group) and the pseudo-label actors are placed on the nodes:
    # PACK fills a node first; SPREAD prefers distinct nodes (a lost node then takes fewer of them down);
    # STRICT_SPREAD demands one Train worker per node (the actors are spread as with SPREAD).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Elastic training (Ray Train V2): a run starts, and goes on after losing a node, with as few as min_workers
    # workers, and grows back to num_workers when the room appears (looked for every resize_interval_s; a resize
    # restarts the workers from the latest checkpoint). None: always num_workers (a run waits for room for all).
    min_workers: int | None = None
    resize_interval_s: float = 60.0
    # How long a DDP collective (an all-reduce, a barrier) waits for the slowest rank before the run fails
    # (torch's process-group timeout; Ray Train's default is 1800 s). Validation is shared by all ranks, so
    # only a checkpoint upload or an evaluation far slower than a training interval comes near it.
    collective_timeout_s: int = 3600


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "outputs/run"
    mode: Literal["full", "byol_finetune", "supervised"] = "full"
    # The metric that picks the best round on validation; balanced accuracy and macro-F1 cannot be won
    # by predicting the majority class.
    select_metric: Literal["accuracy", "balanced_accuracy", "macro_f1"] = "balanced_accuracy"
    name: str = "raysemi"
    seed: int = 0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted keys replaced: ``cfg.replace(**{"pretrain.epochs": 5})``."""
        return apply_overrides(self, dotted)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally coerce) ``value`` against the annotation ``tp``; raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None) -> Config:
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


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
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_yaml(text: str) -> Config:
    return from_dict(yaml.safe_load(text) or {})
