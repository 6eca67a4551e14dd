"""The one storage layer: paths as URIs, atomic writes, JSON, checkpoints (safetensors, torch state), hashes.

Every path is a local path or a URI (``s3://bucket/prefix``) and goes through fsspec (s3fs for ``s3://``), so
the same code reads and writes both. S3 endpoints and credentials come from the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, instance roles; time bounds in ``raysemi.core.s3``); nothing is read from configs. Nothing here imports
Ray: models, data and stages all use it, on a Train worker or in a plain process.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from raysemi.core.config import Config, config_to_yaml, from_dict
from raysemi.core.errors import RaysemiError
from raysemi.core.s3 import BoundedS3FileSystem, s3_options

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
_MAX_HEADER = 100_000_000  # a safetensors header larger than this is not one we wrote


class CheckpointError(RaysemiError):
    """A checkpoint that is missing, unreadable, unsafe or from another model."""


# ---------------------------------------------------------------- paths


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a local path or URI (``s3://``: with the timeouts and
    bounded retries of ``s3_options``)."""
    uri = str(uri)
    if uri.startswith(("s3://", "s3a://")):
        return BoundedS3FileSystem(**s3_options()), BoundedS3FileSystem._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def storage_problem(err: BaseException) -> str | None:
    """One line for a failure of the storage itself (an S3 endpoint that is down, silent or refusing, no
    credentials, a local disk error); None for any other exception, which is a bug to show in full."""
    import aiohttp
    import botocore.exceptions as boto

    if isinstance(err, TimeoutError) and not str(err) and err.__cause__ is not None:
        err = err.__cause__  # fsspec raises a bare FSTimeoutError from the timeout of an S3 call
    text = " ".join(str(err).split())[:300] or "no detail"
    if isinstance(err, (boto.ConnectTimeoutError, boto.ReadTimeoutError)):
        cfg = s3_options()["config_kwargs"]
        return (f"S3 did not answer within {cfg['connect_timeout']:g} s (connect) / {cfg['read_timeout']:g} s "
                f"(read), {cfg['retries']['max_attempts']} tries (RAYSEMI_S3_* settings): {text}")
    if isinstance(err, boto.EndpointConnectionError):
        return f"cannot reach S3 ({text})"
    if isinstance(err, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return f"no usable AWS credentials ({text})"
    if isinstance(err, TimeoutError) and text.startswith("S3 "):
        return text  # the call timeout of BoundedS3FileSystem
    if isinstance(err, (OSError, boto.BotoCoreError, boto.ClientError, aiohttp.ClientError)):
        return f"{type(err).__name__}: {text}"
    return None


@contextmanager
def storage_errors(what: str, error: type[RaysemiError] = RaysemiError) -> Iterator[None]:
    """Inside the block, a failure of the storage (``storage_problem``: S3 down or refusing, no credentials,
    a disk error) becomes one line, ``error(f"{what}: {problem}")``; anything else passes through."""
    try:
        yield
    except RaysemiError:
        raise
    except Exception as err:
        problem = storage_problem(err)
        if problem is None:
            raise
        raise error(f"{what}: {problem}") from err


def join(uri: str, *parts: str) -> str:
    """``uri/part/part``: a URI join that works for local paths and object-store prefixes alike."""
    base = str(uri).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def absolute(uri: str) -> str:
    """A local path made absolute (Ray's workers and Tune's trials run in other working directories); a
    remote URI as it is."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().resolve())


def is_remote(uri: str) -> bool:
    """True for an object-store URI (``s3://``...), False for a local path or ``file://``."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def exists(uri: str) -> bool:
    """Whether a file or folder is at ``uri``."""
    fs, path = filesystem(uri)
    return fs.exists(path)


# ---------------------------------------------------------------- bytes and JSON


def open_exact(uri: str):
    """Open ``uri`` for reading only the byte ranges asked for: on an object store without read-ahead
    (s3fs's default cache fetches megabytes around a Parquet reader's small column and footer reads)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return fs.open(path, "rb")
    return fs.open(path, "rb", cache_type="none")


def read_small_files(uris: list[str]) -> dict[str, bytes]:
    """The contents of many small files, by URI (missing ones left out): on S3 fetched concurrently, one
    request each. All of ``uris`` on one filesystem."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0])
    paths = {filesystem(u)[1]: u for u in uris}
    if hasattr(fs, "cat_small"):
        return {paths[p]: data for p, data in fs.cat_small(list(paths)).items()}
    out = {}
    for path, uri in paths.items():
        try:
            out[uri] = fs.cat_file(path)
        except FileNotFoundError:
            continue
    return out


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write under a temporary name, then move into place. On object stores one PUT is already atomic
    (a reader sees the whole object or none), so the bytes go straight to their name there."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    # Only local folders need creating; on S3, makedirs would create a missing *bucket* (s3fs's
    # create_parents), so a typo in a bucket name would silently make a new bucket.
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:  # leave no temporary behind; the original error is what matters
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:
            pass
        raise


def write_json(uri: str, obj: Any) -> None:
    """Indented JSON, written atomically (numpy floats and the like as floats)."""
    write_bytes_atomic(uri, json.dumps(obj, indent=2, default=float).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


# ---------------------------------------------------------------- hashes and Parquet footers


def file_sha256(uri: str) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parquet_rows(uri: str) -> int:
    """Row count from the Parquet footer (no column data read); FileNotFoundError when it is missing."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return pq.read_metadata(fh).num_rows


# ---------------------------------------------------------------- safetensors


def save_weights(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Model weights as safetensors at a local path or URI; returns the sha256 of the file."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(uri, data)
    return hashlib.sha256(data).hexdigest()


def _header_metadata(head: bytes, uri: str) -> dict[str, str]:
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{uri} is not a safetensors checkpoint (unreadable header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _read_header(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            first = fh.read(8)
            size = struct.unpack("<Q", first)[0] if len(first) == 8 else -1
            if not 0 < size < _MAX_HEADER:
                raise CheckpointError(f"{uri} is not a safetensors checkpoint (bad header size)")
            return fh.read(size)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist") from None


def weights_metadata(uri: str) -> dict[str, str]:
    """The metadata strings of a safetensors file, from its header alone (no tensors read)."""
    return _header_metadata(_read_header(uri), uri)


def weights_header(uri: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes (by name) and metadata strings of a safetensors file, from its header alone: enough
    to tell, in the driver, whether it fits a model before any worker loads it."""
    head = _read_header(uri)
    meta = _header_metadata(head, uri)
    header = json.loads(head)
    shapes = {k: tuple(int(d) for d in v.get("shape", ())) for k, v in header.items()
              if k != "__metadata__" and isinstance(v, dict)}
    return shapes, meta


def load_weights(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read safetensors weights and their metadata from a local path or URI."""
    from safetensors.torch import load

    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist") from None
    try:
        tensors = load(data)
    except Exception as err:
        raise CheckpointError(f"{uri} is not a safetensors checkpoint ({err})") from None
    size = struct.unpack("<Q", data[:8])[0]
    return tensors, _header_metadata(data[8 : 8 + size], uri)


# ---------------------------------------------------------------- torch state (training checkpoints)


def safe_torch_load(data: bytes, name: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` that never unpickles code: anything but tensors and plain containers is refused."""
    try:
        return torch.load(BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError) for a refused payload
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing checkpoint {name}: not a plain tensor checkpoint ({first})") from None


def save_state(directory: str | Path, state: dict[str, Any], cfg: Config | None = None) -> None:
    """Tensors and plain containers only (``torch.save``), read back with ``weights_only=True``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    if cfg is not None:
        (directory / CONFIG_FILE).write_text(config_to_yaml(cfg))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """What ``save_state`` wrote, refused (``CheckpointError``) unless it is tensors and plain containers."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} in checkpoint {directory}")
    return safe_torch_load(path.read_bytes(), str(path), map_location)


def read_config_beside(uri: str) -> Config:
    """The resolved config saved next to an output (``<dir>/config.yaml``)."""
    import yaml

    return from_dict(yaml.safe_load(read_bytes(join(uri, CONFIG_FILE))))
