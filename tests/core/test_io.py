"""raysemi.core.io: S3 calls bounded in time (connect/read timeouts, botocore's retries, a timeout per call)."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import pytest

from raysemi.core import io as rio
from raysemi.core.errors import RaysemiError
from tests.conftest import point_s3_at


@pytest.fixture
def silent_s3(monkeypatch):
    """An "S3 endpoint" that accepts connections and never answers nor reads (a frozen server), with timeouts
    of 1 s and 2 tries per request."""
    import s3fs

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    point_s3_at(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    s3fs.S3FileSystem.clear_instance_cache()
    server.close()
    for conn in held:
        conn.close()


def failure(call) -> tuple[str, float]:
    """The one-line description of what ``call`` raised, and how long it took to raise it."""
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        call()
    return rio.storage_problem(caught.value), time.monotonic() - start


@pytest.mark.timeout(60)  # the unbounded version waits forever: fail instead of hanging the suite
def test_a_frozen_s3_endpoint_fails_reads_and_writes_in_a_bounded_time(silent_s3):
    # The write is the case that hung: botocore asks for "100 Continue" on uploads and aiohttp waits for it
    # with no timeout at all.
    for call in (lambda: rio.write_bytes_atomic("s3://bucket/ds/x.json", b"{}"),
                 lambda: rio.read_bytes("s3://bucket/ds/x.json")):
        problem, took = failure(call)
        assert problem is not None and "S3 did not answer within 1 s (connect) / 1 s (read), 2 tries" in problem
        assert "\n" not in problem
        assert took < 15  # 2 tries of 1 s, the backoff between, the client's start


@pytest.mark.timeout(60)
def test_an_upload_the_server_never_reads_ends_at_the_call_timeout(silent_s3, monkeypatch):
    # aiohttp has no write timeout: once the socket buffers are full, only the per-call timeout ends the PUT.
    monkeypatch.setenv("RAYSEMI_S3_CALL_TIMEOUT", "3")
    problem, took = failure(lambda: rio.write_bytes_atomic("s3://bucket/big.bin", bytes(48 << 20)))
    assert problem == "S3 put_object did not finish within 3 s (RAYSEMI_S3_CALL_TIMEOUT)"
    assert took < 12


def test_s3_settings_come_from_the_environment_and_travel_with_the_filesystem(monkeypatch):
    fs, path = rio.filesystem("s3://bucket/prefix/file")
    assert path == "bucket/prefix/file"
    assert fs.config_kwargs == {"connect_timeout": 5.0, "read_timeout": 20.0,
                                "retries": {"max_attempts": 3, "mode": "standard"}}
    monkeypatch.setenv("RAYSEMI_S3_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("RAYSEMI_S3_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("RAYSEMI_S3_CALL_TIMEOUT", "90")
    fs, _ = rio.filesystem("s3://bucket/prefix")
    # Ray Train pickles the storage filesystem to its workers: the settings go with it, and s3fs's own retry
    # loop stays at one try there too (botocore's retries only, never 5 x botocore's).
    copy = pickle.loads(pickle.dumps(fs))
    for f in (fs, copy):
        assert f.config_kwargs["read_timeout"] == 7.5 and f.config_kwargs["retries"]["max_attempts"] == 4
        assert f.call_timeout == 90 and f.retries == 1
    for bad in ("0", "-1", "soon", "2.5"):  # 2.5: a number of tries is a whole number
        monkeypatch.setenv("RAYSEMI_S3_MAX_ATTEMPTS", bad)
        with pytest.raises(RaysemiError, match=f"RAYSEMI_S3_MAX_ATTEMPTS='{bad}' is not valid"):
            rio.filesystem("s3://bucket/prefix")
    assert rio.filesystem("/tmp/x")[0].__class__.__name__ == "LocalFileSystem"  # local paths: untouched
