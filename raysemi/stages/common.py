"""Pieces the training stages share: mixed precision, step timing, DDP wrapping."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from raysemi import ray_utils

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Autocast to bf16/fp16 on CUDA; a no-op on CPU (CPU autocast slows small convnets down)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 on CUDA (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap ``module`` when a process group is up (Ray Train's), else return it as is."""
    if not ray_utils.is_distributed() or ray_utils.world_size() == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


class StepTimer:
    """Splits an epoch's wall time into waiting for data and computing, for the data-wait metric."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.total = 0.0
        self.images = 0
        self._start = time.perf_counter()

    def batches(self, loader) -> Iterator[Any]:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            self.wait += time.perf_counter() - t0
            yield batch

    def stop(self) -> None:
        self.total = time.perf_counter() - self._start

    @property
    def data_wait_fraction(self) -> float:
        return self.wait / self.total if self.total > 0 else 0.0


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ray_utils.is_distributed():
        torch.distributed.all_reduce(t)
    return t.tolist()
