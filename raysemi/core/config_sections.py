"""The sections of the config tree (``data``, ``augment``, ...): pydantic dataclasses, each value's type and
bounds next to its field. :mod:`raysemi.core.config` assembles them into ``Config``, checks what spans several
fields and turns pydantic's errors into one-line ``ConfigError``s.

Strictness is per type (``StrictInt``...) rather than ``ConfigDict(strict=True)``: a strict pydantic dataclass
refuses a mapping for a nested section, and YAML gives nothing else. The coercions allowed are the ones YAML
needs: an int for a float, a list for a tuple; never a bool for a number, nor a string for anything else.
Sections stay (pydantic) dataclasses so that ``dataclasses.replace``/``asdict`` keep working on them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

SECTION = ConfigDict(extra="forbid")  # with frozen=True in each decorator: a frozen, hashable, picklable tree


def fixed_length(n: int) -> BeforeValidator:
    """A list (YAML's only sequence) or tuple of exactly ``n`` items, as a tuple; anything else refused."""

    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or len(value) != n:
            raise PydanticCustomError("fixed_length", "expected a list of {n} values, got {got}",
                                      {"n": n, "got": repr(value)})
        return tuple(value)

    return BeforeValidator(check)


def _ascending_fraction(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not 0.0 < lo <= hi <= 1.0:
        raise PydanticCustomError("scale_range", "{value} is not in (0, 1] (want 0 < min <= max <= 1)",
                                  {"value": repr(value)})
    return value


def _fraction_or_count(value: float) -> float:
    if 0.0 < value <= 1.0 or (value > 1.0 and value.is_integer()):
        return value
    raise PydanticCustomError("budget", "{value} is neither a fraction in (0, 1] nor a whole number of images",
                              {"value": repr(value)})


Probability = Annotated[StrictFloat, Field(ge=0, le=1)]
Positive = Annotated[StrictFloat, Field(gt=0)]
ProbabilityPair = Annotated[tuple[Probability, Probability], Strict(), fixed_length(2)]
# An AfterValidator sees the validated tuple (a list already made a tuple, an int already a float).
CropScale = Annotated[tuple[StrictFloat, StrictFloat], Strict(), fixed_length(2), AfterValidator(_ascending_fraction)]
Rgb = Annotated[tuple[StrictFloat, StrictFloat, StrictFloat], Strict(), fixed_length(3)]
PositiveRgb = Annotated[tuple[Positive, Positive, Positive], Strict(), fixed_length(3)]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["lars", "sgd", "adamw"]


@dataclass(frozen=True, config=SECTION)
class DataConfig:
    path: StrictStr = "outputs/demo/dataset"  # dataset URI: local folder or s3://bucket/prefix
    image_size: StrictInt = Field(64, ge=16, le=1024)  # training resolution (square)
    loader: Literal["auto", "dali", "torch"] = "auto"  # auto = DALI wherever it imports
    num_threads: StrictInt = Field(2, ge=1)  # decode threads per worker (DALI) / DataLoader workers (torch)
    # torch loader: each training image decoded once per run, its pixels kept up to this many MB per
    # loader (raysemi.data.loading.decoded_cache); 0 = decode every epoch
    decode_cache_mb: StrictInt = Field(2048, ge=0, description="0 = off")
    # "Few labels" on a fully labeled set: keep a deterministic subset (by id hash) of train labels.
    label_fraction: StrictFloat | None = Field(None, gt=0, le=1)
    labels_per_class: StrictInt | None = Field(None, ge=1)
    label_seed: StrictInt = 0


@dataclass(frozen=True, config=SECTION)
class AugmentConfig:
    """BYOL's asymmetric two-view recipe (Grill et al. 2020, Table 6); greyscale-friendly defaults."""

    crop_scale: CropScale = (0.08, 1.0)
    hflip_p: Probability = 0.5
    jitter_p: Probability = 0.8
    brightness: StrictFloat = 0.4
    contrast: StrictFloat = 0.4
    saturation: StrictFloat = 0.2
    hue: StrictFloat = 0.0  # 0.1 in the paper; hue carries no information in greyscale radiographs
    grey_p: Probability = 0.2
    blur_p: ProbabilityPair = (1.0, 0.1)  # view 1, view 2
    solarize_p: ProbabilityPair = (0.0, 0.2)
    mean: Rgb = (0.485, 0.456, 0.406)
    std: PositiveRgb = (0.229, 0.224, 0.225)
    # Fine-tuning's (single-view) augmentation; not part of the pretraining cache key.
    # "light": crop + flip (the method paper's); "trivialaugment": + torchvision's TrivialAugmentWide
    # (Mueller & Hutter 2021); "randaugment": + RandAugment(2, 9) (Cubuk et al. 2020).
    finetune_policy: Literal["light", "trivialaugment", "randaugment"] = "trivialaugment"
    finetune_crop_scale: CropScale = (0.35, 1.0)


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    backbone: StrictStr = "resnet18"  # any timm model name
    small_image: StrictBool = True  # 3x3 stem, no max-pool: for 28-64 px inputs
    proj_hidden_dim: StrictInt = Field(4096, ge=1)  # BYOL paper defaults
    proj_dim: StrictInt = Field(256, ge=1)
    pred_hidden_dim: StrictInt = Field(4096, ge=1)
    head: Literal["projector", "encoder"] = "projector"  # paper: classifier on the projector output
    sync_batchnorm: StrictBool = False  # CUDA only: Config checks ray.use_gpu


@dataclass(frozen=True, config=SECTION)
class PretrainConfig:
    epochs: StrictInt = Field(100, ge=1)
    batch_size: StrictInt = Field(256, ge=1)  # global, split across workers (Config: >= ray.num_workers)
    optimizer: Optimizer = "lars"
    lr: StrictFloat = Field(0.2, gt=0)  # base lr per 256 images, scaled linearly with the global batch (BYOL: 0.2 x B/256)
    weight_decay: StrictFloat = Field(1.5e-6, ge=0)
    warmup_epochs: StrictInt = Field(10, ge=0)  # Config: <= epochs
    tau_base: StrictFloat = Field(0.99, ge=0, lt=1)
    # auto = bf16 autocast where the device has bf16 units (GPU; CPU with AMX / AVX512-BF16), else fp32
    precision: Precision = "auto"
    channels_last: StrictBool = True  # NHWC: faster on GPUs and on the CPUs measured (bench/pretrain.py)
    compile: StrictBool = False  # torch.compile the networks (pays only in long runs: bench/pretrain.py)
    checkpoint_every: StrictInt = Field(1, ge=1)  # epochs
    knn_every: StrictInt = Field(5, ge=0)  # epochs; 0 disables the kNN monitor
    knn_k: StrictInt = Field(20, ge=1)
    seed: StrictInt = 0
    cache: StrictStr | None = None  # URI of the content-addressed pretraining cache (raysemi.pipeline.pretrain_cache); None = off


@dataclass(frozen=True, config=SECTION)
class FinetuneConfig:
    """Fine-tuning and every retraining round. Training length is counted in optimizer steps (``steps``),
    the same for every round and every baseline whatever the size of its training set; ``steps: null``
    falls back to ``epochs`` passes over the training set (the method paper's way)."""

    # optimizer steps per round; null = epochs x steps per epoch
    steps: StrictInt | None = Field(600, ge=1, description="or null to count in epochs")
    epochs: StrictInt = Field(30, ge=1)  # used only when steps is null
    eval_every: StrictInt = Field(100, ge=1)  # steps between validations/reports when counting in steps
    batch_size: StrictInt = Field(64, ge=1)  # Config: >= ray.num_workers
    optimizer: Optimizer = "adamw"
    lr: StrictFloat = Field(0.001, gt=0)  # peak lr, not scaled
    weight_decay: StrictFloat = Field(0.05, ge=0)
    # when counting in steps (at most the steps: a shorter run warms up throughout)
    warmup_steps: StrictInt = Field(50, ge=0)
    warmup_epochs: StrictInt = Field(0, ge=0)  # when counting in epochs; Config: <= epochs
    freeze_backbone: StrictBool = False  # True = linear probe
    # lr of the pretrained parts (backbone, projector) relative to the head's: < 1 keeps more of what
    # pretraining learnt (discriminative fine-tuning, Howard & Ruder 2018). 1 = one lr for all (the paper's).
    backbone_lr_scale: StrictFloat = Field(1.0, gt=0, le=1)
    class_weighting: StrictBool = True  # inverse-frequency class weights in the loss (labelled + pseudo rows)
    pseudo_weight: StrictFloat = Field(1.0, gt=0)  # loss weight of a pseudo-labeled row relative to a true label
    label_smoothing: StrictFloat = Field(0.1, ge=0, lt=1)
    # EMA of the weights (timm ModelEmaV3, warmed up); 0 = off. The EMA model is validated, exported and
    # labels the pool
    ema_decay: StrictFloat = Field(0.998, ge=0, lt=1)
    dropout: StrictFloat = Field(0.0, ge=0, lt=1)  # before the classifier head (Noisy Student's student noise)
    drop_path_rate: StrictFloat = Field(0.1, ge=0, lt=1)  # stochastic depth where the timm backbone has it
    precision: Precision = "auto"  # also inference: validation, pseudo-labels
    channels_last: StrictBool = True
    compile: StrictBool = False
    checkpoint_every: StrictInt = Field(5, ge=1)  # epochs (with steps: evaluation intervals)
    seed: StrictInt = 0


@dataclass(frozen=True, config=SECTION)
class PseudoLabelConfig:
    rounds: StrictInt = Field(2, ge=0)
    # Pseudo-labels added per round (cumulative: round r uses the r x budget most confident). A value
    # <= 1 is a fraction of the unlabelled pool (0.2 = a fifth of it), a larger one a count of images.
    budget: Annotated[StrictFloat, AfterValidator(_fraction_or_count)] = 0.25
    # How the budget is shared among the predicted classes: "top" = most confident overall (the method
    # paper's), "balanced" = equal shares, "prior" = shares in proportion to the labelled class counts.
    selection: Literal["top", "balanced", "prior"] = "prior"
    # Share of each round's training rows that are true labels, reached by repeating them (0 = no
    # repetition): at equal steps per round, pseudo-labels would otherwise crowd the true labels out.
    labeled_share: StrictFloat = Field(0.0, ge=0, lt=1)
    soft_targets: StrictBool = False  # train on the teacher's probabilities (Noisy Student) instead of argmax
    temperature: StrictFloat = Field(1.0, gt=0)  # soft targets: p^(1/T), renormalised; < 1 sharpens
    min_confidence: Probability = 0.0
    num_actors: StrictInt = Field(2, ge=1)
    batch_size: StrictInt = Field(256, ge=1)
    cpus_per_actor: StrictFloat = 1.0  # Config: an actor needs CPUs or GPUs
    gpus_per_actor: StrictFloat = 0.0
    retrain_from: Literal["pretrained", "previous"] = "pretrained"
    # Rounds >= 1 train at finetune.lr times this: with retrain_from "previous", < 1 continues the teacher
    # gently instead of training it again at full strength.
    retrain_lr_scale: StrictFloat = Field(1.0, gt=0)


@dataclass(frozen=True, config=SECTION)
class FixMatchConfig:
    """FixMatch's consistency loss on the unlabelled pool (Sohn et al. 2020; ``stages/consistency.py``): the
    whole of ``run.mode=fixmatch`` (BYOL weights, the labelled rows and this term, no offline rounds), and with
    ``in_rounds`` an extra term in every fine-tuning of the method's rounds."""

    weight: StrictFloat = Field(1.0, gt=0)  # lambda_u, the unlabelled loss's weight (FixMatch: 1)
    threshold: StrictFloat = Field(0.95, gt=0, le=1)  # tau: the teacher's confidence a pool row needs (FixMatch: 0.95)
    # mu: pool images per labelled image in a step (FixMatch: 7). Each costs a teacher forward on the weak view
    # and a student forward + backward on the strong one: the CPU recipe uses fewer.
    ratio: StrictInt = Field(7, ge=1)
    ema_teacher: StrictBool = False  # the teacher: the student itself (FixMatch), or its EMA (finetune.ema_decay > 0)
    in_rounds: StrictBool = False  # run.mode=full: the same term during every round's fine-tuning too


@dataclass(frozen=True, config=SECTION)
class RayConfig:
    address: StrictStr | None = None  # None: attach to a running cluster if there is one, else start a local Ray
    num_workers: StrictInt = Field(2, ge=1)
    use_gpu: StrictBool = False
    cpus_per_worker: StrictFloat = Field(1.0, gt=0)
    # Torch threads of a Train worker. None: the node's CPUs shared among the Train workers on it (Ray itself
    # gives a worker of 0.99 CPU one thread: half a 2-core machine idle while one worker trains).
    torch_threads: StrictInt | None = Field(None, ge=1)
    # Ray Train's checkpoints; None = <run.output_dir>/ray. Must be shared by all nodes (s3://) on a cluster.
    storage_path: StrictStr | None = None
    max_failures: StrictInt = Field(2, ge=0)
    # How the Train workers (their placement group) and the pseudo-label actors are placed on the nodes:
    # PACK fills a node first; SPREAD prefers distinct nodes (a lost node then takes fewer of them down);
    # STRICT_SPREAD demands one Train worker per node (the actors are spread as with SPREAD).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Elastic training (Ray Train V2): a run starts, and goes on after losing a node, with as few as min_workers
    # workers, and grows back to num_workers when the room appears (looked for every resize_interval_s; a resize
    # restarts the workers from the latest checkpoint). None: always num_workers (a run waits for room for all).
    min_workers: StrictInt | None = Field(None, ge=1)  # Config: <= num_workers
    resize_interval_s: StrictFloat = Field(60.0, ge=0)
    # How long a DDP collective (an all-reduce, a barrier) waits for the slowest rank before the run fails
    # (torch's process-group timeout; Ray Train's default is 1800 s). Validation is shared by all ranks, so
    # only a checkpoint upload or an evaluation far slower than a training interval comes near it.
    collective_timeout_s: StrictInt = Field(3600, ge=1, description="seconds")


@dataclass(frozen=True, config=SECTION)
class RunConfig:
    output_dir: StrictStr = "outputs/run"
    mode: Literal["full", "byol_finetune", "supervised", "fixmatch"] = "full"
    # The metric that picks the best round on validation; balanced accuracy and macro-F1 cannot be won
    # by predicting the majority class.
    select_metric: Literal["accuracy", "balanced_accuracy", "macro_f1"] = "balanced_accuracy"
    name: StrictStr = "raysemi"
    seed: StrictInt = 0
