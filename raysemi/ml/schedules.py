"""Schedules as pure functions of the step (lightly ``utils/scheduler.py`` style).

Pure functions, not ``LRScheduler`` objects: the value at a step depends only on the step, so resuming
from a checkpoint needs nothing but the step counter, and the same code serves lr and EMA tau.
"""

from __future__ import annotations

import math


def _check_step(step: int, total_steps: int, name: str = "total_steps") -> None:
    if total_steps <= 0:
        raise ValueError(f"{name} must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float) -> float:
    """Half-cosine from ``start_value`` at step 0 to ``end_value`` at ``max_steps`` (held after)."""
    _check_step(step, max_steps, "max_steps")
    progress = min(step, max_steps) / max_steps
    return end_value - (end_value - start_value) * (math.cos(math.pi * progress) + 1.0) / 2.0


def warmup_cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0
) -> float:
    """Linear warmup to ``base_lr``, then cosine decay to ``final_lr`` at ``total_steps``.

    Warmup (Goyal et al. 2017) gives ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``
    (starts at base_lr / warmup_steps, not 0, so no step is wasted; reaches base_lr at its last step);
    then the cosine (Loshchilov & Hutter 2017; BYOL's schedule) starts at ``base_lr`` at
    ``step == warmup_steps`` and ends at ``final_lr`` at ``step == total_steps``; later steps hold it.
    ``warmup_steps == total_steps`` means warmup only (the config allows warmup_epochs == epochs).
    """
    _check_step(step, total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:  # also covers warmup_steps == total_steps (no cosine phase)
        return final_lr
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, base_lr, final_lr)


def byol_tau(step: int, total_steps: int, tau_base: float = 0.99) -> float:
    """BYOL's EMA rate: ``1 - (1 - tau_base) * (cos(pi * step / total_steps) + 1) / 2``.

    Grill et al. 2020, sec. 3.3 (tau_base = 0.996 at batch 4096; the default 0.99 is close to it in their
    tau ablation and moves the target faster in short runs). ``tau_base`` at step 0, 1.0 at ``total_steps``.
    """
    if not 0.0 <= tau_base <= 1.0:
        raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
    return cosine_schedule(step, total_steps, tau_base, 1.0)


def scale_lr(base_lr: float, global_batch_size: int, reference: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017; BYOL: lr = 0.2 x BatchSize / 256)."""
    if global_batch_size <= 0 or reference <= 0:
        raise ValueError(f"batch sizes must be > 0, got {global_batch_size} and reference {reference}")
    return base_lr * global_batch_size / reference
