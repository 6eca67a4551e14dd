"""What machine a benchmark ran on, for its JSON: the CPU (model, cores, bf16 matrix-unit flags), the GPU, and
the versions that change figures. Machines of the same kind differ in CPU (Intel Xeons with AMX / AVX512-BF16,
AMD EPYCs without), so every figure is read next to this."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The CPU and its bf16 / AMX / AVX-512 flags, the GPU, and the library versions."""
    import pyarrow
    import ray
    import torch
    import torchvision

    from raysemi.data.loading.dali import dali_available
    from raysemi.ml.compute import BF16_CPU_FLAGS, cpu_flags, cpu_has_bf16_units

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_bf16_flags": sorted(f for f in cpu_flags() if f in BF16_CPU_FLAGS or f.startswith(("amx", "avx512"))),
        "cpu_has_bf16_units": cpu_has_bf16_units(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if dali_available():
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    return info
