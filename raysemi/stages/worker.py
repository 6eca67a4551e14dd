"""The skeleton of a Ray Train worker, shared by pretraining and fine-tuning.

Both workers build their model with the same seed on every rank, convert BatchNorm to SyncBatchNorm when
asked, DDP-wrap what they train, restore model, optimizer, GradScaler (and the EMA, for fine-tuning) from
the checkpoint Ray Train hands a restarted worker group, and report metrics with a checkpoint of the same
state. The ML (what is built, what one step does) stays in the stages; the Ray calls in ``ray_utils``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from raysemi.core.config import Config
from raysemi.distributed import ray_utils


def use_threads(torch_threads: int | None) -> int:
    """Set this worker's torch threads: ``torch_threads``, or (None) the node's CPUs shared among the Train
    workers on it; returns the count. Ray sets ``OMP_NUM_THREADS`` to a worker's whole CPUs (one for 0.99)."""
    n = torch_threads or max(1, ray_utils.node_cpus() // ray_utils.local_world_size())
    torch.set_num_threads(n)
    return n


def build_replica(build: Callable[[], nn.Module], seed: int, sync_batchnorm: bool, device: torch.device) -> nn.Module:
    """``build()`` on ``device`` with the same initial weights on every rank (DDP also broadcasts rank 0's);
    BatchNorm becomes SyncBatchNorm with ``sync_batchnorm`` on more than one worker, so that every layer
    normalises with the statistics of the global batch."""
    torch.manual_seed(seed)
    model = build().to(device)
    if sync_batchnorm and ray_utils.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass
class TrainState:
    """The objects a worker checkpoints: model, optimizer, loss scaler and, when on, the EMA model."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None = None

    def state_dict(self, **progress: Any) -> dict[str, Any]:
        """Every object's state plus ``progress`` (epoch or step, history), as the checkpoint holds it."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), **progress}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()`` back into the objects (the progress keys stay with the caller)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])

    def restore(self, device: torch.device) -> dict[str, Any] | None:
        """Load the checkpoint Ray Train restored for this worker group, if any; returns it (for the progress)."""
        state = ray_utils.restored_state(device)
        if state is not None:
            self.load_state_dict(state)
        return state

    def report(self, metrics: dict[str, Any], cfg: Config, checkpoint: bool, **progress: Any) -> None:
        """Report ``metrics`` from every rank; rank 0 adds a checkpoint of the state when ``checkpoint``."""
        state = self.state_dict(**progress) if checkpoint and ray_utils.world_rank() == 0 else None
        ray_utils.report(metrics, state, cfg if state is not None else None)
