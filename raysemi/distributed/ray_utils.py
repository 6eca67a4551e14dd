"""Ray plumbing, and no ML: Train configs, rank/device helpers, reporting to Ray Train.

Checkpoint files themselves (torch state, safetensors) are read and written by ``raysemi.core.io``.

Stages call these helpers so that the same worker code runs in a Ray Train worker (DDP over gloo or NCCL)
and in a plain process (tests, single-process benchmarks): outside Ray Train the rank is 0 of 1 and the
device is CUDA when available, else CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from raysemi.core import console
from raysemi.core.config import Config, RayConfig
from raysemi.core.io import filesystem, is_remote, join, load_state, save_state
from raysemi.distributed import ray_session

log = logging.getLogger("raysemi")

# Scheduling option of the stages' own tasks and actors: outside any placement group the caller runs in.
# A Tune trial's placement group captures its child tasks (placement_group_capture_child_tasks=True) and
# holds only the trial's own 0.01 CPU; "DEFAULT" is Ray's documented way out of it. Outside Tune it is the
# default anyway. Train V2 places its workers in a placement group of its own and needs nothing.
OUTSIDE_PLACEMENT_GROUP = {"scheduling_strategy": "DEFAULT"}

# ---------------------------------------------------------------- Train configs


def scaling_config(rc: RayConfig):
    """Ray Train's scaling: ``ray.num_workers`` workers, or elastic between ``ray.min_workers`` and it. The
    stages keep their global batch (split over the workers there are) and count their schedule in global steps,
    so that a run that shrinks or grows follows the same schedule."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = 1
    elastic = rc.min_workers is not None and rc.min_workers < rc.num_workers
    return ScalingConfig(num_workers=(rc.min_workers, rc.num_workers) if elastic else rc.num_workers,
                         use_gpu=rc.use_gpu, resources_per_worker=resources,
                         placement_strategy=rc.placement_strategy,
                         elastic_resize_monitor_interval_s=rc.resize_interval_s)


def actor_scheduling(rc: RayConfig) -> dict[str, str]:
    """Scheduling option of the stages' own actors: ``OUTSIDE_PLACEMENT_GROUP`` (Ray's default placement),
    or Ray's "SPREAD" strategy (best effort over the nodes) when ``ray.placement_strategy`` spreads; like
    "DEFAULT", an explicit "SPREAD" also keeps the actors out of a Tune trial's placement group."""
    if rc.placement_strategy == "PACK":
        return dict(OUTSIDE_PLACEMENT_GROUP)
    return {"scheduling_strategy": "SPREAD"}


def storage_for(uri: str) -> tuple[str, Any]:
    """``storage_path`` and ``storage_filesystem`` for Ray Train from a local path or URI. Remote storage goes
    through the same fsspec filesystem as the data (so the same AWS environment and endpoint apply)."""
    if not is_remote(uri):
        return str(Path(uri).expanduser().resolve()), None
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def storage_root(cfg: Config) -> str:
    """Where Ray Train keeps a run's checkpoints: ``ray.storage_path``, else inside the run's output folder."""
    return cfg.ray.storage_path or join(cfg.run.output_dir, "ray")


def run_config(name: str, cfg: Config):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    path, fs = storage_for(storage_root(cfg))
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        # Ray Train's own INFO lines (worker group start, process group, every checkpoint) on the console
        # only with --verbose; they always reach Ray's log files.
        logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "WARNING"),
    )


# ---------------------------------------------------------------- inside a worker


def _train_context():
    try:
        import ray.train

        return ray.train.get_context()
    except Exception:  # not inside a Ray Train worker
        return None


def world_rank() -> int:
    ctx = _train_context()
    return ctx.get_world_rank() if ctx is not None else 0


def world_size() -> int:
    ctx = _train_context()
    return ctx.get_world_size() if ctx is not None else 1


def local_world_size() -> int:
    """The Train workers on this node (1 outside Ray Train)."""
    ctx = _train_context()
    return ctx.get_local_world_size() if ctx is not None else 1


def node_cpus() -> int:
    """The CPUs of this node that a worker may use (the process's affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_device() -> torch.device:
    """The worker's device: Ray Train's assignment inside a worker, else CUDA if present, else CPU."""
    if _train_context() is not None:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, cfg: Config | None = None) -> None:
    """Report metrics (and, from the rank that passes ``state``, a checkpoint) to Ray Train.
    Every rank must call this the same number of times. Outside Ray Train it only logs."""
    if _train_context() is None:
        log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        return
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, state, cfg)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restored_state(map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state of the latest reported checkpoint when Ray Train restarts this worker group, else None."""
    if _train_context() is None:
        return None
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_state(d, map_location)


# ---------------------------------------------------------------- launching


def train_run_exists(name: str, cfg: Config) -> bool:
    fs, path = filesystem(join(storage_root(cfg), name))
    return fs.exists(path)


def remove_train_run(name: str, cfg: Config) -> None:
    """Forget a Ray Train run (its checkpoints): Ray Train V2 resumes any run whose name it finds. Only what
    Ray Train writes there goes; the folder too, once that leaves it empty."""
    from raysemi.core.outputs import TRAIN_RUN, clear

    uri = join(storage_root(cfg), name)
    fs, path = filesystem(uri)
    if fs.exists(path) and not clear(uri, TRAIN_RUN) and fs.exists(path):
        fs.rm(path, recursive=True)  # an empty folder (on S3 a prefix has nothing left to remove)


def _quiet_worker(worker_fn, config: dict[str, Any]) -> None:
    """Run ``worker_fn(config)`` without Ray Train's per-rank "Reporting training result ..." line: Train V2
    logs it at INFO under a logger named by its file path (outside ``ray.train``, so ``LoggingConfig`` misses it),
    once per rank and report. The stages print their own line per epoch from rank 0."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    worker_fn(config)


def fit(worker_fn, loop_config: dict[str, Any], cfg: Config, name: str):
    """Run ``worker_fn`` on ``cfg.ray.num_workers`` Ray Train workers (DDP process group: NCCL on GPU, gloo
    on CPU; on a Ray that is all on loopback, through a file and loopback sockets, ``ray_rendezvous``) and return the ``ray.train.Result``. A run of the same name in the storage
    path is resumed from its latest checkpoint (Ray Train V2 restores it)."""
    from ray.train.torch import TorchTrainer

    from raysemi.distributed.ray_rendezvous import LoopbackTorchConfig

    ray_session.init_ray(cfg.ray.address)
    trainer = TorchTrainer(
        worker_fn if console.verbose() else functools.partial(_quiet_worker, worker_fn),
        train_loop_config=loop_config,
        torch_config=LoopbackTorchConfig(timeout_s=cfg.ray.collective_timeout_s),
        scaling_config=scaling_config(cfg.ray),
        run_config=run_config(name, cfg),
    )
    return trainer.fit()
