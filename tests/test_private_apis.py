"""The private APIs of Ray and s3fs that raysemi relies on are still where it uses them.

raysemi pins the Ray it is tested with (pyproject.toml); these fail loudly, naming the API, when an upgrade
moves one, instead of a run misbehaving later. Each entry says where raysemi uses it.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import version

import pytest

PRIVATE = [
    # module, attribute path, where raysemi uses it
    ("ray._private.services", "canonicalize_bootstrap_address", "ray_session.init_ray: the cluster `ray start` made"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTERS_ENV_VAR", "ray_session._loopback_node"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER", "ray_session._loopback_node"),
    ("ray._private.worker", "_global_node", "ray_session._watch_driver: the session folder"),
    ("ray._private.worker", "global_worker", "ray_session._drop_worker_log_lines"),
    ("ray._private.worker", "global_worker_stdstream_dispatcher.remove_handler", "ray_session._drop_worker_log_lines"),
    ("ray._private.worker", "global_worker_stdstream_dispatcher.add_handler", "ray_session._drop_worker_log_lines"),
    ("ray._private.worker", "print_to_stdstream", "ray_session._drop_worker_log_lines"),
    ("ray._private.worker", "_should_ignore_worker_log_prefix", "ray_session._drop_worker_log_lines"),
    ("ray._private.authentication.authentication_token_setup", "__name__", "ray_session._quiet_ray_notices (logger)"),
    ("ray.train.v2._internal.execution.context", "__file__", "ray_utils._quiet_worker (logger named by the file)"),
    ("s3fs", "S3FileSystem._call_s3", "s3.BoundedS3FileSystem: the per-call timeout"),
    ("s3fs", "S3FileSystem.set_session", "s3.BoundedS3FileSystem: no Expect: 100-continue"),
    ("s3fs", "S3FileSystem._cache", "s3.BoundedS3FileSystem: one instance cache"),
    ("fsspec.asyn", "sync_wrapper", "s3.BoundedS3FileSystem.call_s3 / cat_small"),
]


@pytest.mark.parametrize(("module", "path", "used_by"), PRIVATE, ids=[f"{m}.{p}" for m, p, _ in PRIVATE])
def test_private_api_is_still_there(module, path, used_by):
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} no longer imports ({err}): used by {used_by}")
    for part in path.split("."):
        if not hasattr(obj, part):
            pytest.fail(f"{module}.{path} is gone ({part!r} missing): used by {used_by}")
        obj = getattr(obj, part)


def test_s3fs_call_s3_keeps_the_signature_the_override_forwards():
    import s3fs

    params = list(inspect.signature(s3fs.S3FileSystem._call_s3).parameters)
    assert params[:2] == ["self", "method"], f"s3fs.S3FileSystem._call_s3{params}: s3.BoundedS3FileSystem forwards (method, *args, **kwargs)"


def test_ray_is_the_pinned_version():
    pinned = next(d for d in importlib.metadata.requires("raysemi") if d.startswith("ray["))
    assert version("ray").startswith("2.60."), f"Ray {version('ray')} installed; raysemi is tested with {pinned}"
    assert "==2.60.*" in pinned
