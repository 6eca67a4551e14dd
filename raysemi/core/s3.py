"""S3 through s3fs with every request bounded in time: botocore's timeouts and retries, no wait for
``100 Continue``, a timeout per call. ``raysemi.core.io.filesystem`` hands this filesystem out for ``s3://`` paths.

The settings come from the environment of each process (``RAYSEMI_S3_*``), so that Ray workers on other nodes
apply the ones their node was given.
"""

from __future__ import annotations

import os
from typing import Any

import s3fs
from fsspec.asyn import sync_wrapper

from raysemi.core.errors import RaysemiError

# S3 timeouts and retries: (environment variable, default, what it is). A stopped or frozen S3 endpoint
# fails a request after at most attempts x (connect or read timeout) + the backoff between attempts, and any
# one call (its retries included) after the call timeout.
S3_SETTINGS = {
    "connect_timeout": ("RAYSEMI_S3_CONNECT_TIMEOUT", 5.0, "seconds to open a connection"),
    "read_timeout": ("RAYSEMI_S3_READ_TIMEOUT", 20.0, "seconds to wait for the next bytes of an answer"),
    "max_attempts": ("RAYSEMI_S3_MAX_ATTEMPTS", 3, "tries per request, the first included"),
    "call_timeout": ("RAYSEMI_S3_CALL_TIMEOUT", 300.0, "seconds one call may take, its retries included"),
}


class BoundedS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose every call ends in a bounded time (settings from ``s3_options``):

    - the retries are botocore's ("standard" mode); s3fs's own loop (5 tries of every failed call, around
      botocore's) is cut to one try (``retries``, a class attribute so that it holds wherever the filesystem
      is unpickled, e.g. Ray Train's storage filesystem on the workers);
    - no ``Expect: 100-continue`` on uploads: aiohttp waits for the ``100 Continue`` with no timeout at all, so
      a frozen server held every PUT forever; without it, the read timeout applies once the body is sent;
    - each S3 call, retries included, is cancelled after ``call_timeout`` seconds: aiohttp has no write timeout,
      and a server that stops reading in the middle of a large upload would otherwise hold it forever.
    """

    retries = 1

    def __init__(self, *args, call_timeout: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.call_timeout = call_timeout

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 (s3fs's signature)
        from botocore.handlers import add_expect_header

        client = await super().set_session(refresh, kwargs)
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    async def _call_s3(self, method, *akwarglist, **kwargs):
        import asyncio

        from fsspec.exceptions import FSTimeoutError

        try:
            return await asyncio.wait_for(super()._call_s3(method, *akwarglist, **kwargs), self.call_timeout)
        except asyncio.TimeoutError:
            raise FSTimeoutError(f"S3 {method} did not finish within {self.call_timeout:g} s "
                                 "(RAYSEMI_S3_CALL_TIMEOUT)") from None

    call_s3 = sync_wrapper(_call_s3)  # s3fs's wraps its own _call_s3; its open files call this one

    async def _cat_small(self, paths: list[str], concurrency: int = 64) -> dict[str, bytes]:
        """Small objects (markers), fetched concurrently with one GET each; missing ones are left out. (s3fs's
        ``cat`` first sends a HEAD per path, for its size: two requests where one does.)"""
        import asyncio

        gate = asyncio.Semaphore(concurrency)

        async def one(path: str) -> tuple[str, bytes | None]:
            async with gate:
                try:
                    return path, await self._cat_file(path, max_concurrency=1)
                except FileNotFoundError:
                    return path, None

        return {p: data for p, data in await asyncio.gather(*(one(p) for p in paths)) if data is not None}

    cat_small = sync_wrapper(_cat_small)


# One instance cache with s3fs's own, so that ``s3fs.S3FileSystem.clear_instance_cache()`` (new credentials or
# endpoint in the environment) also drops the clients made here.
BoundedS3FileSystem._cache = s3fs.S3FileSystem._cache


def s3_options() -> dict[str, Any]:
    """The storage options that bound every S3 request: botocore's connect/read timeouts and its "standard"
    retry mode (exponential backoff with jitter, ``max_attempts`` tries in all, the first included), each
    overridable by its ``RAYSEMI_S3_*`` environment variable (``S3_SETTINGS``)."""
    values: dict[str, Any] = {}
    for key, (var, default, what) in S3_SETTINGS.items():
        raw = os.environ.get(var, "").strip()
        try:
            value = type(default)(raw) if raw else default
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise RaysemiError(f"{var}={raw!r} is not valid: it is the S3 {what}, a positive number")
        values[key] = value
    return {
        "config_kwargs": {
            "connect_timeout": values["connect_timeout"],
            "read_timeout": values["read_timeout"],
            "retries": {"max_attempts": values["max_attempts"], "mode": "standard"},
        },
        "call_timeout": values["call_timeout"],
    }
