"""Starting Ray: a Ray that cannot start or be reached is one line (RaysemiError), not Ray's traceback; a
private local Ray ends with the driver that started it, even when that driver is SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from raysemi.core.errors import RaysemiError
from raysemi.distributed import ray_session
from tests.procs import NO_OTHER_RAY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def failing_ray_init(monkeypatch):
    """``ray.init`` raising what Ray raises on a loaded machine (ray/_private/node.py: a bare Exception)."""
    import ray
    from ray._private import services

    shutdowns = []

    def init(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda *a, **k: None)
    monkeypatch.setattr(ray_session, "_loopback_node", contextlib.nullcontext, raising=False)  # env left alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return shutdowns


def test_ray_that_cannot_start_is_one_line(failing_ray_init):
    with pytest.raises(RaysemiError, match="Ray could not start on this machine: The current node timed out") as err:
        ray_session.init_ray()
    assert "\n" not in str(err.value)
    assert failing_ray_init == [True]  # what a half-started Ray left is shut down


def test_cluster_that_cannot_be_reached_is_one_line(failing_ray_init):
    with pytest.raises(RaysemiError, match="cannot attach to the Ray cluster at 10.0.0.5:6379: The current node"):
        ray_session.init_ray("10.0.0.5:6379")


# ---------------------------------------------------------------- a killed driver takes its private Ray along

_DRIVER = NO_OTHER_RAY + textwrap.dedent(
    """
    import time
    import ray
    from raysemi.distributed.ray_session import init_ray

    init_ray()
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process too
    print("SESSION " + ray._private.worker._global_node.get_session_dir_path(), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _using(folder: str) -> list[int]:
    """Living processes (this test's own excepted) that name ``folder`` on their command line or hold a file
    under it: every process of a Ray whose RAY_TMPDIR it is (workers and agents log there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not _alive(int(entry.name)):
            continue
        with contextlib.suppress(OSError):
            if folder.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
                continue
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(folder):
                        found.append(int(entry.name))
                        break
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_private_ray_ends_with_its_killed_driver(tmp_path):
    """A driver that started a private Ray through init_ray is SIGKILLed: within 30 s no process of that Ray
    (GCS, raylet, dashboard, the raylet's agents, workers) is left and none of its ports listens. Without the
    watchdog the dashboard and runtime-env agents lived on for 60-90 s with their ports open."""
    from tests.procs import descendants, listening_sockets

    ray_tmp = tempfile.mkdtemp(prefix="rswd-", dir="/tmp")  # short: Ray's unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, HOME=str(tmp_path), PYTHONPATH=str(REPO))
    out = tmp_path / "driver.out"
    with open(out, "w") as fh:
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER], env=env, cwd=tmp_path, stdout=fh,
                                  stderr=subprocess.STDOUT)
    try:
        deadline, session, sockets = time.monotonic() + 180, None, set()
        while time.monotonic() < deadline and driver.poll() is None:
            session = session or next((ln.split()[1] for ln in out.read_text().splitlines()
                                       if ln.startswith("SESSION ")), None)
            pids = descendants(driver.pid)
            sockets = listening_sockets(pids)
            titles = {cmd for _, _, cmd in sockets}
            if session and {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= titles:
                break  # the agents (the processes that outlived the driver) are up, with their ports
            time.sleep(0.5)
        else:
            pytest.fail(f"the private Ray did not come up (rc={driver.poll()}):\n{out.read_text()[-3000:]}")
        assert _using(ray_tmp), "no process found under RAY_TMPDIR: the check below would prove nothing"
        driver.kill()
        driver.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            left = sorted({*(p for p in pids if _alive(p)), *_using(ray_tmp)})
            if not left:
                break
            time.sleep(0.5)
        held = listening_sockets(left)
        assert not left and not held, f"left after 30 s: {left}, listening: {sorted(held)}"
        print(f"{len(pids)} processes, {len(sockets)} listening sockets: all gone "
              f"{time.monotonic() - t0:.1f} s after the SIGKILL")
        log = Path(session, "logs", "raysemi_watchdog.log").read_text()
        assert log.startswith(f"driver {driver.pid} ended: "), log
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in _using(ray_tmp):  # a failed run's leftovers: this test's Ray only
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
