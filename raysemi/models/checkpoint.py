"""Model files: the fine-tuned classifier as safetensors with the resolved config in its metadata.

A classifier file holds tensors only, plus metadata strings (config YAML, class names, head type), so
loading it never unpickles anything. The model is rebuilt from the config (``timm.create_model``) and
the weights are loaded strictly: a file from another architecture or class count is refused.
"""

from __future__ import annotations

import json
import logging

import torch

from raysemi.core.config import Config, config_from_yaml, config_to_yaml
from raysemi.core.io import CheckpointError, load_weights, save_weights, weights_header
from raysemi.models.backbone import backbone_for, feature_dim
from raysemi.models.byol import Classifier, split_online_state
from raysemi.models.heads import ProjectionHead

log = logging.getLogger(__name__)


def classifier_backbone(cfg: Config) -> torch.nn.Module:
    """The encoder of a classifier: ``cfg.model``'s backbone with fine-tuning's stochastic depth
    (``finetune.drop_path_rate``; a no-op in eval mode, so saved weights load either way). Models that
    take no ``drop_path_rate`` are built without it."""
    m = cfg.model
    rate = cfg.finetune.drop_path_rate
    if rate > 0:
        try:
            return backbone_for(m, drop_path_rate=rate)
        except TypeError:
            log.warning("%s has no stochastic depth: finetune.drop_path_rate=%s is ignored", m.backbone, rate)
    return backbone_for(m)


def build_classifier(cfg: Config, num_classes: int) -> Classifier:
    """A randomly initialised classifier of ``cfg``'s architecture (the supervised-only baseline)."""
    m = cfg.model
    backbone = classifier_backbone(cfg)
    projector = None
    if m.head == "projector":
        projector = ProjectionHead(feature_dim(backbone), m.proj_hidden_dim, m.proj_dim)
    return Classifier(backbone, num_classes, head=m.head, projector=projector, dropout=cfg.finetune.dropout)


def _check_same_backbone(cfg: Config, meta: dict[str, str], uri: str) -> None:
    saved = config_from_yaml(meta.get("config", "{}"))
    if (saved.model.backbone, saved.model.small_image) != (cfg.model.backbone, cfg.model.small_image):
        raise CheckpointError(
            f"{uri} holds a {saved.model.backbone} (small_image={saved.model.small_image}) backbone, "
            f"not the configured {cfg.model.backbone} (small_image={cfg.model.small_image})"
        )


def _check_shapes(want: dict[str, torch.Tensor], have: dict[str, tuple[int, ...]], uri: str, what: str) -> None:
    """Refuse ``have`` (tensor shapes from a file's header) unless it holds exactly ``want``'s tensors."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if tuple(want[k].shape) != tuple(have[k]))
    if missing or extra or wrong:
        if wrong:
            k = wrong[0]
            detail = f"{k} is {list(have[k])}, the model's is {list(want[k].shape)}"
        else:
            detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        count = len(missing) + len(extra) + len(wrong)
        raise CheckpointError(f"{uri} does not fit the configured {what}: {detail} ({count} tensors differ)")


def check_init(cfg: Config, num_classes: int, init_uri: str, classifier: bool) -> None:
    """In the driver, from the file's header alone (no tensors read, nothing built but on the meta device):
    refuse an initialisation that would fail in the workers. ``classifier``: a ``classifier.safetensors``
    (class count and every tensor shape of ``cfg``'s classifier), else a ``byol.safetensors`` (backbone and
    its tensor shapes; a projector for ``model.head=projector``)."""
    shapes, meta = weights_header(init_uri)
    with torch.device("meta"):
        if classifier:
            if "classes" not in meta or "config" not in meta:
                raise CheckpointError(f"{init_uri} is not a raysemi classifier (no classes/config metadata)")
            classes = json.loads(meta["classes"])
            if len(classes) != num_classes:
                raise CheckpointError(f"{init_uri} predicts {len(classes)} classes, the dataset has {num_classes}")
            _check_same_backbone(cfg, meta, init_uri)
            _check_shapes(build_classifier(cfg, num_classes).state_dict(), shapes, init_uri, "classifier")
            return
        if "config" not in meta:
            raise CheckpointError(f"{init_uri} is not a raysemi BYOL checkpoint (no config metadata)")
        _check_same_backbone(cfg, meta, init_uri)
        try:
            bb, proj = split_online_state(shapes)
        except ValueError as err:
            raise CheckpointError(f"{init_uri} is not a BYOL checkpoint: {err}") from None
        _check_shapes(backbone_for(cfg.model).state_dict(), bb,
                      init_uri, f"{cfg.model.backbone} backbone")
        if cfg.model.head == "projector" and not ({"net.0.weight", "net.3.weight"} <= set(proj)):
            raise CheckpointError(f"{init_uri} has no BYOL projector, which model.head=projector needs")


def load_byol(cfg: Config, byol_uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``byol.safetensors``; refused when it was pretrained with another backbone."""
    tensors, meta = load_weights(byol_uri)
    _check_same_backbone(cfg, meta, byol_uri)
    return tensors


def classifier_from_byol(cfg: Config, num_classes: int, byol_uri: str) -> Classifier:
    """A classifier initialised from pretrained BYOL weights (online encoder, + projector by default)."""
    tensors = load_byol(cfg, byol_uri)
    backbone = classifier_backbone(cfg)
    try:
        return Classifier.from_byol(tensors, num_classes, head=cfg.model.head, backbone=backbone,
                                    dropout=cfg.finetune.dropout)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{byol_uri} does not fit the configured model: {str(err).splitlines()[0]}"
        ) from None


def backbone_from_byol(cfg: Config, byol_uri: str) -> torch.nn.Module:
    """The online encoder of a ``byol.safetensors`` alone (the kNN probe's frozen features)."""
    backbone = backbone_for(cfg.model)
    try:
        backbone.load_state_dict(split_online_state(load_byol(cfg, byol_uri))[0])
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{byol_uri} does not fit the configured backbone: {str(err).splitlines()[0]}"
        ) from None
    return backbone


def save_classifier(
    uri: str, model: Classifier, cfg: Config, classes: list[str], extra: dict | None = None
) -> str:
    """Write the classifier; returns the file's sha256 (the model's identity for prediction commits)."""
    meta = {
        "config": config_to_yaml(cfg),
        "classes": json.dumps(classes),
        "head": model.head_type,
        "extra": json.dumps(extra or {}),
    }
    return save_weights(uri, model.state_dict(), meta)


def load_classifier(uri: str, device: torch.device | str = "cpu") -> tuple[Classifier, Config, list[str]]:
    """Rebuild a saved classifier in eval mode, with its config and class names."""
    tensors, meta = load_weights(uri)
    if "classes" not in meta or "config" not in meta:
        raise CheckpointError(f"{uri} is not a raysemi classifier (no classes/config metadata)")
    cfg = config_from_yaml(meta["config"])
    classes = json.loads(meta["classes"])
    model = build_classifier(cfg, len(classes))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{uri} does not match its own config: {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, classes
