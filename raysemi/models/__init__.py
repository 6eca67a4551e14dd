"""Models: timm backbones, BYOL heads, the BYOL online/target pair and the fine-tuning classifier."""

from raysemi.models.backbone import create_backbone, feature_dim
from raysemi.models.byol import BYOL, Classifier, byol_forward, ema_update
from raysemi.models.heads import ClassifierHead, PredictionHead, ProjectionHead

__all__ = [
    "BYOL",
    "Classifier",
    "ClassifierHead",
    "PredictionHead",
    "ProjectionHead",
    "byol_forward",
    "create_backbone",
    "ema_update",
    "feature_dim",
]
