"""Ends the processes of a private local Ray when the driver that started it ends, even by SIGKILL.

    python raysemi/ray_watchdog.py DRIVER_PID SESSION_DIR RAY_PACKAGE_DIR

``ray_session.init_ray`` starts this file (by path, stdlib only: nothing of Ray or raysemi is imported) right
after it has started a private local Ray. Ray makes the processes the driver starts (GCS, raylet, dashboard,
monitors) die with it (PR_SET_PDEATHSIG), but not the raylet's children: its dashboard and runtime-env
agents, with their ports open, lived on for 60-90 s after a killed driver, until their own checks noticed.

The watchdog waits for the driver's end (a pidfd, else polling its parent pid), then ends the processes of
that Ray session and of no other Ray on the machine: its own user's processes that either run a program of
Ray's package and name the session folder on their command line (GCS, raylet, dashboard, monitors), or carry
a Ray title (``ray::...``, ``ray-dashboard-...``) and hold a file under the session folder (agents and
workers write their logs there). SIGTERM first, SIGKILL to whatever is left 2 s later; one line to
``<session>/logs/raysemi_watchdog.log``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path

TERM_GRACE_S = 2.0


def wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` (this process's parent) has ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):  # no pidfd (Linux < 5.3): the parent changes when it ends
        while os.getppid() == pid:
            time.sleep(0.5)
        return
    if os.getppid() != pid:  # ended before the pidfd was opened (and the pid reused)
        return
    select.select([fd], [], [])  # readable when the process has ended


def _cmdline(entry: Path) -> list[str]:
    return [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]


def _holds_file_under(entry: Path, prefix: str) -> bool:
    for fd in (entry / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def session_pids(session: str, ray_dir: str) -> list[int]:
    """This user's processes of the Ray session in the folder ``session`` (see the module's docstring)."""
    session, ray_dir = session.rstrip("/"), ray_dir.rstrip("/") + "/"
    me, uid, found = os.getpid(), os.getuid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            args = _cmdline(entry)
            if not args:  # a zombie: it holds nothing any more
                continue
            ray_program = any(a.startswith(ray_dir) for a in args[:2]) and any(session in a for a in args)
            ray_titled = args[0].startswith(("ray::", "ray-dashboard-"))
            if ray_program or (ray_titled and _holds_file_under(entry, session + "/")):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def end_session(session: str, ray_dir: str) -> int:
    """SIGTERM the session's processes, SIGKILL those left after ``TERM_GRACE_S``; the number ended."""
    ended: set[int] = set()
    for _ in range(3):  # a process may start while the others end (a worker the raylet had asked for)
        pids = session_pids(session, ray_dir)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        ended.update(pids)
    return len(ended)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[0].isdigit():
        print("usage: ray_watchdog.py DRIVER_PID SESSION_DIR RAY_PACKAGE_DIR", file=sys.stderr)
        return 2
    driver, session, ray_dir = int(argv[0]), argv[1], argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle
    wait_for_exit(driver)
    t0 = time.monotonic()
    n = end_session(session, ray_dir)
    try:
        with open(os.path.join(session, "logs", "raysemi_watchdog.log"), "a") as log:
            log.write(f"driver {driver} ended: {n} processes of this Ray session ended in "
                      f"{time.monotonic() - t0:.1f} s\n")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
