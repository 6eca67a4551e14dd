"""Heads: BYOL projection / prediction MLPs and the fine-tuning classifier.

Modelled on lightly ``lightly/models/modules/heads.py`` (``BYOLProjectionHead``,
``BYOLPredictionHead``); dimensions are the BYOL paper's (Grill et al. 2020, sec. 3.3: hidden 4096,
output 256). Pass smaller ``hidden_dim`` / ``out_dim`` for small data or tests.
"""

from __future__ import annotations

from torch import Tensor, nn


class _MLP2(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear, the two-layer MLP of BYOL's projector and predictor."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.net = nn.Sequential(
            # No bias before BN: BN's shift makes it redundant (lightly: bias=not batch_norm).
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ProjectionHead(_MLP2):
    """BYOL projector g: encoder features -> latent z (Grill et al. 2020, sec. 3.3: 4096 -> 256)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, hidden_dim, out_dim)


class PredictionHead(_MLP2):
    """BYOL predictor q: z -> prediction of the target's z; same shape as the projector (sec. 3.3)."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, hidden_dim, out_dim)


class ClassifierHead(nn.Module):
    """Linear classifier (optionally after dropout) that replaces the predictor for fine-tuning."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.num_classes = in_dim, num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x))
