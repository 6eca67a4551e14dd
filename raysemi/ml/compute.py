"""How a stage computes on its device: the autocast precision and the memory layout, chosen by what the
hardware has.

``precision: auto`` (the default) means bf16 autocast where the hardware has bf16 matrix units (a CUDA GPU
that supports bf16; a CPU whose ``/proc/cpuinfo`` flags name ``amx_bf16`` or ``avx512_bf16``) and fp32
elsewhere: on a CPU without them torch emulates bf16 and a training step runs about 10x slower (measured by
``bench/pretrain.py``). ``fp32``, ``bf16`` and ``fp16`` are taken as given on any device. Under autocast the
weights, BatchNorm statistics, optimizer state and EMA stay fp32; the losses are computed on fp32 outputs.

``channels_last`` (NHWC) is the layout oneDNN and cuDNN convolutions prefer: on the CPUs measured it is faster
in fp32 too (``bench/pretrain.py``), so it is on for every device unless the config turns it off.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16_units() -> bool:
    """True when the CPU runs bf16 matrix work natively (Intel AMX / AVX512-BF16, AMD Zen 4 and later)."""
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` has bf16 units, else ``fp32``; anything else as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


@dataclass(frozen=True)
class Compute:
    """The precision (resolved: fp32, bf16 or fp16) and layout one stage runs with on ``device``."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the reduced precision on this device's type; a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 only (bf16 has fp32's range and needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def model(self, module: nn.Module) -> nn.Module:
        """``module`` in this layout (in place; the weights stay fp32)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images in this layout."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> dict[str, object]:
        """What ran, for the metrics and ``report.json``."""
        return {"device": self.device.type, "precision": self.precision, "channels_last": self.channels_last,
                "cpu_bf16_units": cpu_has_bf16_units(), "torch_threads": torch.get_num_threads()}


def compute_for(device: torch.device, precision: str = "auto", channels_last: bool = True) -> Compute:
    """The ``Compute`` a stage configured with ``precision`` / ``channels_last`` runs with on ``device``."""
    return Compute(torch.device(device), resolve_precision(precision, torch.device(device)), bool(channels_last))
