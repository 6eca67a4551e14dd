"""Starting or attaching to Ray, and no ML: a private loopback-only local Ray whose processes end with this one,
or the cluster of ``ray job submit`` / ``ray start``; Ray's notices no user can act on left out of the output."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from raysemi.core import console
from raysemi.core.errors import RaysemiError

log = logging.getLogger("raysemi")


def init_ray(address: str | None = None) -> None:
    """Attach to the cluster of ``address`` / RAY_ADDRESS (``ray job submit`` sets it) or to one started by
    ``ray start`` on this machine; otherwise start a private local Ray that listens on loopback only
    (dashboard, GCS, raylet, workers, agents) and whose processes end with this one (``ray_watchdog``).
    Token authentication stays as Ray configures it (on by default)."""
    import ray

    if ray.is_initialized():
        return
    if not console.verbose():
        _quiet_ray_notices()
    from ray._private import services

    # RAY_ADDRESS (a Ray job sets it), else the cluster `ray start` recorded on this machine, else none.
    address = address or services.canonicalize_bootstrap_address(None)
    if address:
        _start_ray(address=address, log_to_driver=True)
    else:
        # Ray's state API, which Train's placement-group cleaner calls from its own actor, finds "the" cluster
        # by scanning this machine's processes and fails ("Found multiple active Ray instances") when another
        # Ray runs here too. Giving every process of this Ray its dashboard's address settles it.
        port = _free_loopback_port()
        with _loopback_node():
            _start_ray(dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True,
                       runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        _watch_driver()
    if not console.verbose():
        _drop_worker_log_lines(_RAY_NOISE)


@contextlib.contextmanager
def _loopback_node():
    """While Ray starts, make its node address 127.0.0.1, so that GCS, raylet, workers and agents listen on
    loopback only. Ray turns an explicit ``_node_ip_address="127.0.0.1"`` into the routable address; its
    macOS/Windows rule (no clusters there: the node is localhost) does what is wanted. It is switched on for
    this process (Ray reads it at each call) and, through the environment, for the processes Ray starts, and
    switched back afterwards so that nothing else this process starts (a ``ray start``, a cluster) inherits it."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def _watch_driver() -> None:
    """Start ``ray_watchdog.py`` for the private Ray just started: when this process ends, even by SIGKILL,
    it ends that Ray session's processes (Ray's agents would otherwise live on for a minute or more with their
    ports open). In a session of its own, so that a Ctrl-C or a hang-up of this process's group misses it."""
    import subprocess
    import sys

    import ray
    from ray._private import worker

    if worker._global_node is None:  # ray.init replaced (tests that record its calls): nothing started
        return
    session = worker._global_node.get_session_dir_path()
    subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_watchdog.py")), str(os.getpid()), session,
                      os.path.dirname(ray.__file__)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def _start_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``; a Ray that cannot start or be reached is one line (``RaysemiError``), not
    Ray's traceback. Ray raises a bare ``Exception`` for "node timed out during startup" (a loaded machine),
    ``ConnectionError`` for an address nobody answers at, ``RuntimeError`` for a GCS that did not come up."""
    import ray

    try:
        ray.init(**kwargs)
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = lines[0] if lines else type(err).__name__
        log.debug("ray.init failed", exc_info=True)
        with contextlib.suppress(Exception):  # processes a half-started local Ray left behind
            ray.shutdown()
        address = kwargs.get("address")
        if address:
            raise RaysemiError(f"cannot attach to the Ray cluster at {address}: {why}") from err
        raise RaysemiError(f"Ray could not start on this machine: {why} (a loaded machine: try again, or start "
                           "one with `ray start --head` and set RAY_ADDRESS)") from err


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Lines Ray prints that no user can act on: a Ray-internal notice about Train's own preemption watcher
# (ray-project/ray#53727) and the note that token authentication is on (it is the default; the warning when
# it is *off* stays).
_RAY_NOISE = ("'PreemptionWatcher' and ID",)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def _quiet_ray_notices() -> None:
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessages("Token authentication is enabled"))


def _drop_worker_log_lines(fragments: tuple[str, ...]) -> None:
    """Leave out of the worker output Ray forwards to this driver the lines holding one of ``fragments``.
    Ray has no public hook for this: when its private dispatcher changes, every line is printed as before."""
    try:
        from ray._private import worker as ray_worker

        dispatcher, printer = ray_worker.global_worker_stdstream_dispatcher, ray_worker.print_to_stdstream
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    except (ImportError, AttributeError):
        return

    def handler(data: dict) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(f in ln for f in fragments)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)
