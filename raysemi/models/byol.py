"""BYOL (Grill et al. 2020, arXiv 2006.07733) and the fine-tuned classifier built from it.

Design: the online and the target network are two separate submodules of ``BYOL``::

    BYOL
      online: OnlineNetwork(backbone, projector, predictor)   <- trained; the only part DDP wraps
      target: TargetNetwork(backbone, projector)              <- EMA of online, requires_grad=False

The target must never be wrapped in DDP: it has no gradients (DDP would complain or all-reduce
nothing) and its weights come from the EMA, which every rank computes identically from the
already-synchronised online weights. So the recommended training pattern is::

    model = BYOL(backbone, feature_dim(backbone), ...).to(device)
    online = ray.train.torch.prepare_model(model.online)    # or DDP(model.online); never model.target
    model.train()                                            # both networks: BN in train mode, as in BYOL
    for x1, x2 in loader:
        out = byol_forward(online, model.target, x1, x2)     # dict: p1, p2, z1_t, z2_t, y1
        loss = symmetric_byol_loss(out)
        opt.zero_grad(); loss.backward(); opt.step()         # opt built over model.online only
        model.update_target(byol_tau(step, total_steps))     # EMA after the optimizer step

DDP wraps the very same ``OnlineNetwork`` object, so ``model.update_target`` sees the synchronised
weights; ``model.state_dict()`` has ``online.*`` and ``target.*`` keys. Without DDP, ``model(x1, x2)``
is the same as ``byol_forward(model.online, model.target, x1, x2)``. ``OnlineNetwork.forward``
takes both views so that there is exactly one DDP forward per backward. The target's BN running
statistics stay rank-local (DDP broadcasts buffers of the online network only); they are unused while
the target runs in train mode, and only the online network is carried into fine-tuning.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from raysemi.models.backbone import feature_dim, unwrap
from raysemi.models.heads import ClassifierHead, PredictionHead, ProjectionHead


class OnlineNetwork(nn.Module):
    """Online network: encoder f, projector g, predictor q (Grill et al. 2020, fig. 2)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        # Views go through separately (not concatenated) so BN statistics are per view, as in BYOL.
        y1 = self.backbone(x1)
        p1 = self.predictor(self.projector(y1))
        p2 = self.predictor(self.projector(self.backbone(x2)))
        return {"p1": p1, "p2": p2, "y1": y1.detach()}


class TargetNetwork(nn.Module):
    """Target network: EMA copies of the online encoder and projector; never trained by gradients."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    @torch.no_grad()
    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector(self.backbone(x1)).detach(), self.projector(self.backbone(x2)).detach()


def byol_forward(online: nn.Module, target: nn.Module, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
    """One BYOL step's outputs: online predictions ``p1, p2``, target projections ``z1_t, z2_t``
    (no grad) and the online encoder features of view 1 ``y1`` (detached, for monitoring).

    ``online`` may be DDP-wrapped; ``target`` must not be.
    """
    out = dict(online(x1, x2))
    out["z1_t"], out["z2_t"] = target(x1, x2)
    return out


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """``target = tau * target + (1 - tau) * online`` for parameters and floating-point buffers.

    BN running statistics are averaged too (the DESIGN's convention; lightly's ``update_momentum``
    covers parameters only); integer buffers (``num_batches_tracked``) take the online value.
    ``tau=1`` leaves the target unchanged, ``tau=0`` copies the online network (BYOL eq. 2).
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    online, target = unwrap(online), unwrap(target)
    on_p, tg_p = dict(online.named_parameters()), dict(target.named_parameters())
    on_b, tg_b = dict(online.named_buffers()), dict(target.named_buffers())
    if on_p.keys() != tg_p.keys() or on_b.keys() != tg_b.keys():
        raise ValueError("online and target networks differ in structure (parameter/buffer names)")

    t_float = [tg_p[k] for k in tg_p] + [b for k, b in tg_b.items() if b.is_floating_point()]
    o_float = [on_p[k] for k in tg_p] + [on_b[k] for k, b in tg_b.items() if b.is_floating_point()]
    if t_float:
        # Foreach kernels: a handful of launches instead of one per tensor (matters for ResNet-50 on GPU).
        torch._foreach_mul_(t_float, tau)
        torch._foreach_add_(t_float, o_float, alpha=1.0 - tau)
    for k, b in tg_b.items():
        if not b.is_floating_point():
            b.copy_(on_b[k])


class BYOL(nn.Module):
    """BYOL model: ``online`` (backbone, projector, predictor) and its EMA ``target`` (see module doc).

    Head sizes default to the paper's (sec. 3.3: 4096 hidden, 256 out).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int | None = None,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
    ) -> None:
        super().__init__()
        feat_dim = feature_dim(backbone) if feat_dim is None else feat_dim
        projector = ProjectionHead(feat_dim, proj_hidden_dim, proj_dim)
        predictor = PredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.online = OnlineNetwork(backbone, projector, predictor)
        # Target starts as an exact copy of the online encoder + projector (BYOL: xi initialised to theta).
        self.target = TargetNetwork(copy.deepcopy(backbone), copy.deepcopy(projector))
        self.target.requires_grad_(False)

    # Convenience views on the submodules (the names the rest of the package uses).
    @property
    def backbone(self) -> nn.Module:
        return self.online.backbone

    @property
    def projector(self) -> nn.Module:
        return self.online.projector

    @property
    def predictor(self) -> nn.Module:
        return self.online.predictor

    @property
    def target_backbone(self) -> nn.Module:
        return self.target.backbone

    @property
    def target_projector(self) -> nn.Module:
        return self.target.projector

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        return byol_forward(self.online, self.target, x1, x2)

    def update_target(self, tau: float) -> None:
        """EMA step of the target encoder and projector towards the online ones."""
        ema_update(self.online.backbone, self.target.backbone, tau)
        ema_update(self.online.projector, self.target.projector, tau)


HeadType = Literal["projector", "encoder"]


class Classifier(nn.Module):
    """The fine-tuned model: the predictor replaced by a linear classification head.

    ``head="projector"`` (the method paper's choice, sec. 4.2.1): encoder -> projector -> linear, the
    projector trained along. ``head="encoder"``: linear head on the encoder features (the common
    alternative; ``projector`` is then ignored). ``self.head_type`` records which one was used.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: HeadType = "projector",
        projector: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if head not in ("projector", "encoder"):
            raise ValueError(f"head must be 'projector' or 'encoder', got {head!r}")
        if head == "projector" and projector is None:
            raise ValueError("head='projector' needs a projector (e.g. via Classifier.from_byol)")
        self.head_type: str = head
        self.backbone = backbone
        self.projector = projector if head == "projector" else None
        in_dim = _out_features(projector) if self.projector is not None else feature_dim(backbone)
        self.head = ClassifierHead(in_dim, num_classes, dropout)
        self._frozen: list[nn.Module] = []

    def forward(self, x: Tensor) -> Tensor:
        y = self.backbone(x)
        if self.projector is not None:
            y = self.projector(y)
        return self.head(y)

    @classmethod
    def from_byol(
        cls,
        source: BYOL | Mapping[str, Tensor],
        num_classes: int,
        head: HeadType = "projector",
        backbone: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> Classifier:
        """A classifier initialised from BYOL's online encoder (+ projector for ``head="projector"``).

        ``source`` is a ``BYOL`` model (its online modules are deep-copied) or a state dict of one
        (``BYOL.state_dict()`` or ``BYOL.online.state_dict()``, ``module.`` prefixes tolerated); a state
        dict needs ``backbone``, a freshly created module of the same architecture, to load into. The
        projector's sizes are read from the state dict.
        """
        if isinstance(source, BYOL):
            bb, proj = copy.deepcopy(source.backbone), copy.deepcopy(source.projector)
        else:
            if backbone is None:
                raise ValueError("from_byol with a state dict needs `backbone` (same architecture)")
            bb_sd, proj_sd = split_online_state(source)
            backbone.load_state_dict(bb_sd)
            bb = backbone
            proj = None
            if head == "projector":
                if not proj_sd:
                    raise ValueError("head='projector' but the state dict has no 'online.projector.*' keys")
                w0, w3 = proj_sd["net.0.weight"], proj_sd["net.3.weight"]
                proj = ProjectionHead(w0.shape[1], w0.shape[0], w3.shape[0])
                proj.load_state_dict(proj_sd)
        return cls(bb, num_classes, head=head, projector=proj, dropout=dropout)

    def freeze_backbone(self, include_projector: bool = False) -> None:
        """Linear probe: no gradients into the encoder (and projector if asked), its BN kept in eval."""
        mods = [self.backbone] + (
            [self.projector] if include_projector and self.projector is not None else []
        )
        for m in mods:
            m.requires_grad_(False)
            m.eval()
        self._frozen = mods

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # Frozen parts stay in eval so their BN running statistics do not drift during the probe.
        for m in self._frozen:
            m.eval()
        return self


def _out_features(module: nn.Module) -> int:
    """Output size of a head: its ``out_dim`` attribute, else the last Linear's ``out_features``."""
    out_dim = getattr(module, "out_dim", None)
    if isinstance(out_dim, int):
        return out_dim
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot infer the output size of {type(module).__name__}")
    return linears[-1].out_features


def split_online_state(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Backbone and projector state dicts from a BYOL (or online-network) state dict."""
    bb: dict[str, Tensor] = {}
    proj: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key
        while k.startswith(("module.", "_orig_mod.", "online.")):  # DDP / compile / BYOL prefixes
            k = k.split(".", 1)[1]
        if k.startswith("backbone."):
            bb[k.removeprefix("backbone.")] = value
        elif k.startswith("projector."):
            proj[k.removeprefix("projector.")] = value
    if not bb:
        raise ValueError("state dict has no online backbone keys (expected 'online.backbone.*')")
    return bb, proj
