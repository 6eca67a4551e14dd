"""Fault injection from the tests: find a Ray worker process by the title Ray gives it and kill it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (Linux /proc), None when it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is ``pid`` or one of its ancestors."""
    while pid and pid != ancestor:
        pid = parent_pid(pid) or 0
    return pid == ancestor


def pids_titled(text: str) -> set[int]:
    """This test session's processes whose command line has ``text``: Ray titles a worker
    ``ray::<Class>.<method>`` while a task runs (``ray::RayTrainWorker`` for Ray Train workers). Only
    descendants of this process count (the local Ray's raylet is its child, the workers the raylet's), so
    another Ray on the same machine is never touched."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.add(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return {pid for pid in found if pid != os.getpid() and descends_from(pid, os.getpid())}


def wait_for(probe, running, timeout: float = 240.0, what: str = "the awaited state"):
    """Poll ``probe()`` until it returns something other than None; fails if the future ``running`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert not running.done(), f"finished before the kill: {running.result()}"
        found = probe()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} never showed up")
