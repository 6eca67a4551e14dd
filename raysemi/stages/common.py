"""Pieces the training stages share: step timing, DDP wrapping, sums over ranks (precision: ``raysemi.ml.compute``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from raysemi.distributed import ray_utils


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
