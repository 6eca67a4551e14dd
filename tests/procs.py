"""Fault injection from the tests: find a Ray worker process by the title Ray gives it and kill it."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

# The first lines of a driver script that must start a private local Ray even where another Ray runs on this
# machine (the test session's own): Ray's lookup of "the cluster on this machine" is told there is none.
NO_OTHER_RAY = textwrap.dedent(
    """
    import ray._private.services as services
    def no_running_ray():
        return []
    no_running_ray.cache_clear = lambda: None
    services.find_gcs_addresses = no_running_ray
    """
)


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


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def listening_sockets(pids: list[int]) -> set[tuple[str, int, str]]:
    """``(address, port, command)`` of every TCP socket in LISTEN state held by one of ``pids``, read from
    /proc/net/tcp{,6} and the processes' file descriptors (no psutil, no ss)."""
    import ipaddress

    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A = LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            try:
                cmd = Path(f"/proc/{owner[inode]}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                cmd = "?"
            found.add((str(addr), int(hex_port, 16), cmd))
    return found
