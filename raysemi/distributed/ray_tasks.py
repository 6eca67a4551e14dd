"""Per-row work as Ray tasks: a map of a function over argument tuples, for the data layer's ``Mapper``.

``data/`` takes its per-shard work as a plain mapper (``data.shards.Mapper``) so that it never imports Ray;
the stages hand it ``task_mapper(cfg.ray.address)``, which runs each call as a Ray task on the cluster.
"""

from __future__ import annotations

import functools
from typing import Any

from raysemi.core.errors import RaysemiError
from raysemi.distributed import ray_session, ray_utils

_REMOTES: dict[Any, Any] = {}


def task_mapper(address: str | None = None):
    """A ``data.shards.Mapper`` that runs its calls as Ray tasks on the cluster of ``address``."""
    return functools.partial(map_tasks, address=address)


def map_tasks(fn, args: list[tuple], address: str | None = None, num_cpus: float = 1.0) -> list[Any]:
    """``[fn(*a) for a in args]`` as Ray tasks (outside any placement group, retried when their worker dies),
    results in order. A task that raised a ``RaysemiError`` raises it here; any other error, in one line."""
    import ray

    ray_session.init_ray(address)
    key = (fn, num_cpus)
    if key not in _REMOTES:
        _REMOTES[key] = ray.remote(fn).options(num_cpus=num_cpus, max_retries=3, **ray_utils.OUTSIDE_PLACEMENT_GROUP)
    refs = [_REMOTES[key].remote(*a) for a in args]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        for r in refs:
            ray.cancel(r)
        if isinstance(err.cause, RaysemiError):
            raise err.cause from None
        lines = [ln.strip() for ln in str(err.cause or err).strip().splitlines() if ln.strip()]
        raise RaysemiError(f"{getattr(fn, '__name__', 'a task')} failed: {lines[-1] if lines else err}") from None
