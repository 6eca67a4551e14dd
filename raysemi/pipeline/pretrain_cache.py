"""A content-addressed cache of BYOL pretrainings, shared by runs and tuning trials.

Two runs whose pretraining settings and data are the same get the same weights, so the second need not
compute them: on the method's grid (3 epochs x 3 lr x 3 budgets) 27 trials need only 9 pretrainings.

Key: the sha256 of the canonical JSON of everything that determines the pretrained weights, namely the
``model`` and ``augment`` sections, ``pretrain`` without the settings that do not change the weights
(``cache``, ``checkpoint_every``, ``knn_every``, ``knn_k``), ``data.image_size``, ``data.loader`` and
``data.num_threads`` (the loader backend and its workers shape the augmentation RNG streams),
``ray.num_workers`` (the global batch split and per-rank RNG streams) and the sha256 of the dataset's
``manifest.json`` (which names every shard by its sha256). Entry layout::

    <cache>/<key>/key.json                   the keyed fields, for people
    <cache>/<key>/pretrain/byol.safetensors  what ``stages.pretrain.run`` writes (+ metrics.json, config.yaml)
    <cache>/<key>/COMPLETE.json              written last: an entry without it is not in the cache

Lock: object stores have no locks, so the lock lives in Ray: one detached named actor per cluster
(``raysemi-pretrain-cache-lock`` in namespace ``raysemi``, no CPUs) grants a key to one computing owner
at a time, under a lease that the owner renews from a heartbeat thread. Everybody else polls: the entry
completes (reuse it) or the lease expires because its owner died (take the key over; the pretraining then
resumes from the dead owner's last Ray Train checkpoint, whose run name comes from the key). Storage is the
truth for "done"; the actor only says who computes. If the actor itself is lost, a key may be computed
twice, which wastes time but stays correct (both write the same entry atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from raysemi.core.config import Config
from raysemi.core.errors import RaysemiError
from raysemi.core.io import filesystem, join, write_bytes_atomic
from raysemi.data.shards import MANIFEST, DatasetError

log = logging.getLogger("raysemi.pipeline.pretrain_cache")

KEY_VERSION = 1  # bump when the meaning of the key changes
LOCK_ACTOR = "raysemi-pretrain-cache-lock"
NAMESPACE = "raysemi"
COMPLETE = "COMPLETE.json"
KEY_FILE = "key.json"
UNKEYED_PRETRAIN = ("cache", "checkpoint_every", "knn_every", "knn_k")
LEASE_S = 30.0  # a computing owner that has not renewed its lease for this long is presumed dead
POLL_S = 5.0


class CacheError(RaysemiError):
    """A pretraining cache that cannot be read or used."""


@dataclass(frozen=True)
class CacheResult:
    key: str
    entry: str  # <cache>/<key>
    weights: str  # URI of byol.safetensors
    reused: bool  # computed by somebody else (or by this caller under another label)
    waited_s: float  # time spent waiting for another owner's computation
    seconds: float  # wall time of this call


# ---------------------------------------------------------------- the key


def manifest_sha256(data_uri: str) -> str:
    fs, path = filesystem(join(data_uri, MANIFEST))
    try:
        with fs.open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except FileNotFoundError:
        raise DatasetError(f"no {MANIFEST} at {data_uri}: not a raysemi dataset") from None


def key_fields(cfg: Config, manifest_sha: str) -> dict[str, Any]:
    """The config values (and data hash) that determine the pretrained weights."""
    d = cfg.to_dict()
    pretrain = {k: v for k, v in d["pretrain"].items() if k not in UNKEYED_PRETRAIN}
    return {
        "version": KEY_VERSION,
        "model": d["model"],
        # Fine-tuning's own augmentation does not touch the pretrained weights.
        "augment": {k: v for k, v in d["augment"].items() if not k.startswith("finetune_")},
        "pretrain": pretrain,
        "data": {k: d["data"][k] for k in ("image_size", "loader", "num_threads")},
        "ray": {"num_workers": d["ray"]["num_workers"]},
        "manifest_sha256": manifest_sha,
    }


def cache_key(cfg: Config, manifest_sha: str | None = None) -> str:
    fields = key_fields(cfg, manifest_sha or manifest_sha256(cfg.data.path))
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lookup(cache: str, key: str) -> dict[str, Any] | None:
    """The COMPLETE marker of ``key`` (with ``weights`` made absolute), or None when the entry is not done."""
    entry = join(cache, key)
    fs, path = filesystem(join(entry, COMPLETE))
    fs.invalidate_cache(path)  # polled while another owner computes: never trust a cached listing
    try:
        with fs.open(path, "rb") as fh:
            marker = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"pretraining cache entry {entry} is unreadable ({err})") from None
    weights = join(entry, marker["weights"])
    wfs, wpath = filesystem(weights)
    if not wfs.exists(wpath):
        log.warning("cache entry %s is marked complete but %s is missing: recomputing", entry, weights)
        return None
    return {**marker, "weights": weights}


# ---------------------------------------------------------------- the lock


class CacheLock:
    """Per-key leases (run as one detached named Ray actor): who computes which key, until when."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}  # key -> (owner, expiry as time.time())

    def acquire(self, key: str, owner: str, lease_s: float) -> str | None:
        """Grant ``key`` to ``owner`` (returns None) unless another owner holds a live lease (returns it)."""
        now = time.time()
        held = self.leases.get(key)
        if held is not None and held[0] != owner and held[1] > now:
            return held[0]
        self.leases[key] = (owner, now + lease_s)
        return None

    def renew(self, key: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease; False when the key has passed to somebody else."""
        return self.acquire(key, owner, lease_s) is None

    def release(self, key: str, owner: str) -> None:
        held = self.leases.get(key)
        if held is not None and held[0] == owner:
            del self.leases[key]

    def holders(self) -> dict[str, tuple[str, float]]:
        return dict(self.leases)


def lock_actor():
    """The cluster's lock actor (created on first use; detached, so no run's exit takes it down)."""
    import ray

    from raysemi.distributed import ray_utils

    return ray.remote(CacheLock).options(
        name=LOCK_ACTOR, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_restarts=-1, max_task_retries=-1, **ray_utils.OUTSIDE_PLACEMENT_GROUP,
    ).remote()


class _Heartbeat:
    """Renews a lease every ``lease_s / 4`` seconds from a daemon thread until stopped."""

    def __init__(self, lock, key: str, owner: str, lease_s: float) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            import ray

            while not self._stop.wait(lease_s / 4):
                try:
                    if not ray.get(lock.renew.remote(key, owner, lease_s)):
                        log.warning("lost the lease on %s to another owner", key)
                except Exception as err:  # the actor restarting: try again next beat
                    log.warning("cache lease renewal failed: %s", err)

        self._thread = threading.Thread(target=beat, name="pretrain-cache-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def get_or_compute(
    cache: str,
    key: str,
    compute: Callable[[str], str],
    *,
    label: str = "",
    lease_s: float = LEASE_S,
    poll_s: float = POLL_S,
    fields: dict[str, Any] | None = None,
) -> CacheResult:
    """The entry of ``key`` in ``cache``: found, waited for, or computed here by ``compute(entry_uri)``,
    which must return the URI of the weights inside the entry. Needs Ray (the lock is an actor).

    ``label`` names the caller (a run's output folder): an entry computed earlier under the same label
    (the same run, resumed) does not count as reused.
    """
    import ray

    t0 = time.time()
    entry = join(cache, key)
    owner = f"{label or 'anonymous'}@{default_owner()}"
    lock = lock_actor()
    lease = entry  # the lock's key: one cache's entries do not hold up another cache's
    waited = 0.0
    announced = False
    while True:
        marker = lookup(cache, key)
        if marker is not None:
            reused = marker.get("computed_by") != label or not label
            return CacheResult(key, entry, marker["weights"], reused, waited, time.time() - t0)
        holder = ray.get(lock.acquire.remote(lease, owner, lease_s))
        if holder is None:
            break
        if not announced:
            log.info("pretraining %s is being computed by %s: waiting for it", key[:12], holder)
            announced = True
        time.sleep(poll_s)
        waited = time.time() - t0

    heartbeat = _Heartbeat(lock, lease, owner, lease_s)
    try:
        marker = lookup(cache, key)  # completed between our last look and the grant
        if marker is not None:
            reused = marker.get("computed_by") != label or not label
            return CacheResult(key, entry, marker["weights"], reused, waited, time.time() - t0)
        log.info("pretraining cache miss %s: computing it in %s", key[:12], entry)
        if fields is not None:
            write_bytes_atomic(join(entry, KEY_FILE), json.dumps(fields, indent=2, sort_keys=True).encode())
        t_compute = time.time()
        weights = compute(entry)
        prefix = entry.rstrip("/") + "/"
        if not weights.startswith(prefix):
            raise CacheError(f"cached weights {weights} are not inside the cache entry {entry}")
        marker = {
            "key": key, "weights": weights[len(prefix):], "computed_by": label,
            "seconds": time.time() - t_compute, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_bytes_atomic(join(entry, COMPLETE), json.dumps(marker, indent=2).encode())
        return CacheResult(key, entry, weights, False, waited, time.time() - t0)
    finally:
        heartbeat.stop()
        try:
            ray.get(lock.release.remote(lease, owner))
        except Exception as err:  # the lease will expire on its own
            log.warning("could not release cache key %s: %s", key[:12], err)


# ---------------------------------------------------------------- pretraining through the cache


def pretrain_cached(cfg: Config, *, lease_s: float = LEASE_S, poll_s: float = POLL_S) -> CacheResult:
    """``stages.pretrain.run`` through the cache at ``cfg.pretrain.cache``: reuse, wait, or compute.

    The computation runs with ``run.output_dir = <cache>/<key>`` and ``run.name = pretrain-<key[:12]>``
    (its Ray Train checkpoints under ``ray.storage_path`` when set, else inside the entry), always with
    ``resume=True``, so an owner taking over from a dead one continues its checkpoints.
    """
    from raysemi.distributed import ray_session, ray_utils
    from raysemi.stages import pretrain

    if not cfg.pretrain.cache:
        raise CacheError("pretrain.cache is not set")
    cache = cfg.pretrain.cache
    manifest_sha = manifest_sha256(cfg.data.path)
    key = cache_key(cfg, manifest_sha)
    ray_session.init_ray(cfg.ray.address)

    def compute(entry: str) -> str:
        sub = cfg.replace(**{"run.output_dir": entry, "run.name": f"pretrain-{key[:12]}", "pretrain.cache": None})
        weights = pretrain.run(sub, resume=True).weights
        ray_utils.remove_train_run(pretrain.run_name(sub), sub)  # the weights are in the entry now
        if not sub.ray.storage_path:
            fs, path = filesystem(ray_utils.storage_root(sub))
            if fs.exists(path) and not fs.ls(path):
                fs.rm(path, recursive=True)
        return weights

    result = get_or_compute(cache, key, compute, label=cfg.run.output_dir, lease_s=lease_s, poll_s=poll_s,
                            fields=key_fields(cfg, manifest_sha))
    log.info("pretraining %s: %s (%s)", key[:12], "reused" if result.reused else "computed", result.weights)
    return result
