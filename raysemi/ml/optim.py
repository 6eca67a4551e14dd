"""Optimizers: LARS (You et al. 2017, arXiv 1708.03888; BYOL's choice), SGD and AdamW.

All three put 1-D parameters (biases, BatchNorm/LayerNorm affine) in a group without weight decay;
for LARS that group also skips the trust-ratio adaptation (BYOL paper, sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum, as in BYOL's implementation.

    Per parameter ``w`` with gradient ``g`` (deepmind-research ``byol/utils/optimizers.py``)::

        d = g + weight_decay * w
        if lars_adaptation and |w| > 0 and |d| > 0:  d = d * eta * |w| / |d|
        buf = momentum * buf + d                    (d + momentum * buf with nesterov)
        w = w - lr * buf

    ``lars_adaptation`` and ``weight_decay`` are per-group options, so a group of biases and norm
    parameters can opt out of both (``build_optimizer`` does that).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        lars_adaptation: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS args: lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            nesterov=nesterov,
            lars_adaptation=lars_adaptation,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum, eta = group["weight_decay"], group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if group["lars_adaptation"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    # torch.where, not `if`: no GPU->CPU sync per parameter.
                    ratio = torch.where(
                        (w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm)
                    )
                    d = d.mul(ratio)
                state = self.state[p]
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


OPTIMIZERS = ("lars", "sgd", "adamw")


def param_groups(params_or_model: nn.Module | Iterable[Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters: >= 2-D ones get ``weight_decay``; 1-D ones (biases, norm affine)
    get none and no LARS adaptation. Frozen parameters (``requires_grad=False``) are left out."""
    params = params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_adaptation": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters")
    return groups


def build_optimizer(
    name: str,
    params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> Optimizer:
    """``"lars"`` | ``"sgd"`` | ``"adamw"`` over a model or parameters, 1-D params without weight decay.

    Param-group dicts are passed through unchanged (the caller then owns the split). ``momentum`` is
    unused by AdamW (its betas stay at PyTorch's defaults).
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    items = params_or_model if isinstance(params_or_model, nn.Module) else list(params_or_model)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        groups: list[dict[str, Any]] = items
    else:
        groups = param_groups(items, weight_decay)
    if key == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # 'lars_adaptation' means nothing to SGD/AdamW; drop it to keep their state dicts clean.
    groups = [{k: v for k, v in g.items() if k != "lars_adaptation"} for g in groups]
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every group's lr (times the group's optional ``lr_scale``, e.g. a smaller backbone lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
