"""A real S3 API on loopback: moto's server mode in a process of its own, the one way the tests and the bench
scripts start one (``tests/conftest.py``'s session server, ``tests/data/ingest/test_ingest.py``'s private
servers that a test kills or freezes, ``bench/node_loss.py``, ``bench/ingest.py``, ``bench/scale.py``).

``moto_s3()`` picks a free loopback port, starts ``python -m moto.server`` on it, waits until the server
answers an S3 request, yields an ``S3Server`` (its endpoint, the AWS environment that points clients at it,
and the process, for a test that kills or stops it) and stops the server on exit, a frozen one too. Setting
the environment is left to the caller: a session sets ``os.environ`` for the Ray workers it starts later, a
test uses ``monkeypatch``. Importable as ``tests.moto_s3`` and, with ``tests/`` on ``sys.path``, ``moto_s3``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

# moto accepts any credentials; these are the ones every test and bench run uses.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoStartError(RuntimeError):
    """The moto server exited or did not answer in time."""


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    proc: subprocess.Popen  # the server's process: a test may kill it or freeze it (SIGSTOP)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that sends boto3/s3fs clients (and Ray's workers) to this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an HTTP(S)_PROXY


def _answers(endpoint: str) -> bool:
    """Whether the server answers an S3 request (ListBuckets on ``/``); any HTTP status counts."""
    try:
        with _DIRECT.open(endpoint + "/", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:  # refused, reset, timed out: not serving yet
        return False


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop the server (continued first if it was frozen with SIGSTOP); killed if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def moto_s3(start_timeout_s: float = 30.0, log: str | None = None) -> Iterator[S3Server]:
    """A moto S3 server on a free loopback port for the ``with`` block (see the module docstring); raises
    ``MotoStartError`` when it does not answer within ``start_timeout_s``. ``log``: a file that receives the
    server's request log (``bench/scale.py`` counts the requests in it)."""
    port = free_port()
    with open(log or "/dev/null", "wb") as err:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err)
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _answers(server.endpoint):
            if proc.poll() is not None:
                raise MotoStartError(f"the moto server exited with status {proc.returncode} before it answered")
            if time.monotonic() > deadline:
                raise MotoStartError(f"the moto server did not answer on {server.endpoint} within {start_timeout_s:g} s")
            time.sleep(0.2)
        yield server
    finally:
        stop(proc)
