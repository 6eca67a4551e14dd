"""The training-step rows of ``bench/pretrain.py``: the CPU recipe's BYOL and fine-tuning steps on random batches,
per precision / layout / compile variant, beside a plain PyTorch BYOL loop (the reference of raysemi's overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from raysemi.core.tables import markdown_table


def _plain_byol_step(model, x1, x2, opt, tau: float) -> torch.Tensor:
    """A minimal hand-written BYOL update on the same modules: the reference for raysemi's overhead."""
    import torch.nn.functional as F

    on, tg = model.online, model.target
    p1 = on.predictor(on.projector(on.backbone(x1)))
    p2 = on.predictor(on.projector(on.backbone(x2)))
    with torch.no_grad():
        z1, z2 = tg.projector(tg.backbone(x1)), tg.projector(tg.backbone(x2))
    loss = (2 - 2 * F.cosine_similarity(p1, z2, dim=-1)).mean() + (2 - 2 * F.cosine_similarity(p2, z1, dim=-1)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for o, t in ((on.backbone, tg.backbone), (on.projector, tg.projector)):
            for po, pt in zip(o.parameters(), t.parameters()):
                pt.mul_(tau).add_(po, alpha=1 - tau)
            for bo, bt in zip(o.buffers(), t.buffers()):
                if bt.is_floating_point():
                    bt.mul_(tau).add_(bo, alpha=1 - tau)
    return loss.detach()


# (label, precision, channels_last, compiled): today's step first, the reference of every ratio
VARIANTS = [
    ("fp32, contiguous, eager (before)", "fp32", False, False),
    ("auto, channels_last, eager (default)", "auto", True, False),
    ("auto, channels_last, compiled", "auto", True, True),
    ("bf16, channels_last, eager", "bf16", True, False),
]


def _byol_runner(cfg, compute, compiled: bool, batch: int, size: int):
    from raysemi.ml.optim import build_optimizer
    from raysemi.stages import pretrain

    torch.manual_seed(0)
    m = compute.model(pretrain.build_byol(cfg).train())
    opt = build_optimizer("lars", m.online, 0.1, 1e-6)
    if compiled:
        m.online.compile()
        m.target.compile()
    scaler = compute.grad_scaler()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, batch, 3, size, size, generator=g).unbind(0)
    return lambda: pretrain.byol_step(m, m.online, x1, x2, opt, scaler, 0.99, compute)


def _finetune_runner(cfg, compute, compiled: bool, batch: int, size: int):
    from raysemi.ml.losses import cross_entropy
    from raysemi.ml.optim import build_optimizer
    from raysemi.models.checkpoint import build_classifier

    torch.manual_seed(0)
    m = compute.model(build_classifier(cfg, 3).train())
    opt = build_optimizer("adamw", m.parameters(), 1e-3, 0.05)
    if compiled:
        m.compile()
    scaler = compute.grad_scaler()
    g = torch.Generator().manual_seed(0)
    x, y = compute.images(torch.randn(batch, 3, size, size, generator=g)), torch.randint(0, 3, (batch,), generator=g)

    def step():
        with compute.autocast():
            logits = m(x)
        loss = cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()
    return step


def _time(step, seconds: float) -> tuple[float, int]:
    """Steps per second over about ``seconds`` (after the caller's warm-up)."""
    n, t0 = 0, time.perf_counter()
    while True:
        float(step())  # one host sync per step, here only: the timing must include the work
        n += 1
        if time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0), n


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Training images/s of the CPU config's backbone: BYOL (raysemi's ``byol_step`` and a plain loop) and the
    fine-tuning step, per precision / layout / compile variant, in interleaved repeats. The compile time (first
    step of a compiled model) and the stage length at which it pays back are reported beside."""
    from raysemi.core.config import load_config
    from raysemi.ml.compute import compute_for, cpu_has_bf16_units
    from raysemi.stages import pretrain

    cfg = load_config(args.config, [])
    size, device = cfg.data.image_size, torch.device("cpu")
    torch.set_num_threads(args.threads)
    stages = {"byol step": (_byol_runner, cfg.pretrain.batch_size), "finetune step": (_finetune_runner, cfg.finetune.batch_size)}
    runners: dict[tuple[str, str], Any] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, (build, batch) in stages.items():
        for label, precision, cl, compiled in VARIANTS:
            compute = compute_for(device, precision, cl)
            step = build(cfg, compute, compiled, batch, size)
            t0 = time.perf_counter()
            step()  # the first step: compile (when compiled), allocations, kernel choice
            first = time.perf_counter() - t0
            step()
            runners[(stage, label)] = step
            rows[(stage, label)] = {"what": stage, "impl": label, "precision": compute.precision,
                                    "channels_last": cl, "compiled": compiled, "backbone": cfg.model.backbone,
                                    "size": size, "batch_size": batch, "threads": args.threads,
                                    "first_step_s": round(first, 1), "samples": []}
        if stage == "byol step":
            m = pretrain.build_byol(cfg).train()
            from raysemi.ml.optim import build_optimizer

            opt = build_optimizer("lars", m.online, 0.1, 1e-6)
            g = torch.Generator().manual_seed(0)
            x1, x2 = torch.randn(2, batch, 3, size, size, generator=g).unbind(0)
            runners[(stage, "plain PyTorch loop, fp32")] = lambda m=m, opt=opt, x1=x1, x2=x2: _plain_byol_step(
                m, x1, x2, opt, 0.99)
            rows[(stage, "plain PyTorch loop, fp32")] = {
                "what": stage, "impl": "plain PyTorch loop, fp32", "precision": "fp32", "channels_last": False,
                "compiled": False, "backbone": cfg.model.backbone, "size": size, "batch_size": batch,
                "threads": args.threads, "first_step_s": None, "samples": []}
    keys = list(runners)
    for rep in range(args.repeat):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            slow = rows[key]["precision"] == "bf16" and not cpu_has_bf16_units()  # emulated: ~10x slower
            rate, _ = _time(runners[key], args.step_seconds / (3 if slow else 1))
            rows[key]["samples"].append(rate * rows[key]["batch_size"])
            print(f"  repeat {rep + 1}: {key[0]:<13} {key[1]:<38} {rows[key]['samples'][-1]:8.1f} images/s", flush=True)
    out = []
    for key in keys:
        r = rows[key]
        r["images_per_s"] = round(statistics.median(r["samples"]), 1)
        r["images_per_s_all"] = [round(x, 1) for x in r.pop("samples")]
        out.append(r)
    for stage in stages:
        base = next(r for r in out if r["what"] == stage and r["impl"] == VARIANTS[0][0])
        eager = next(r for r in out if r["what"] == stage and r["impl"] == VARIANTS[1][0])
        for r in out:
            if r["what"] != stage:
                continue
            r["over_before"] = round(r["images_per_s"] / base["images_per_s"], 2)
            if r["compiled"]:
                # Compile pays once the stage runs longer than compile_s / (1 - eager/compiled) seconds.
                gain = 1 - eager["images_per_s"] / r["images_per_s"]
                extra = r["first_step_s"] - (eager["first_step_s"] or 0)
                r["compile_s"] = round(extra, 1)
                r["pays_after_s"] = round(extra / gain, 0) if gain > 0 else None
    return out


def step_overhead(steps: list[dict[str, Any]]) -> float:
    """raysemi's ``byol_step`` (as before: fp32, contiguous, eager) over the plain PyTorch loop."""
    by = {r["impl"]: r for r in steps if r["what"] == "byol step"}
    return by[VARIANTS[0][0]]["images_per_s"] / by["plain PyTorch loop, fp32"]["images_per_s"]


def step_table(steps: list[dict[str, Any]]) -> str:
    """The training-step rows as a Markdown table."""
    cells = ([r["what"], r["impl"], r["precision"], f"{r['images_per_s']:.1f}", f"{r.get('over_before', 1.0):.2f}",
              "" if r.get("compile_s") is None else f"{r['compile_s']:.0f}",
              "" if r.get("compile_s") is None else ("never" if r["pays_after_s"] is None else f"{r['pays_after_s'] / 60:.0f} min"),
              r["images_per_s_all"]] for r in steps)
    return "\n".join(markdown_table(["step", "variant", "ran as", "images/s median", "x before", "compile s",
                                     "compile pays after", "all repeats"], cells))
