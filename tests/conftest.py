"""Session-wide fixtures: a real S3 API on loopback (moto's server mode) and one local Ray session.

The S3 server is started before Ray so that Ray's workers inherit the endpoint and credentials from the
standard AWS environment variables, exactly as they would on a cluster node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.moto_s3 import CREDENTIALS, MotoStartError, moto_s3

REPO = Path(__file__).resolve().parents[1]
COVID = REPO.parent / "shared" / "data" / "covid19-radiography-3class"

# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor (a process) for
# every run; over the tests' many tiny Train runs on 2 cores that was about a tenth of `make test`. No test
# drains a node (the one thing the watcher serves), and every process of the tests (Ray workers, `ray start`
# heads, CLI subprocesses) inherits these from here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# `make test-fast` sets this: every test without Ray, a cluster or a Ray Train run. The tests that need the
# session's Ray are marked `ray` here (by their fixture) and deselected by the Makefile's `-m`; a test that
# starts a Ray of its own some other way is skipped when it tries (`ray.init` below). `make test` runs all.
FAST_TIER = os.environ.get("RAYSEMI_TEST_TIER") == "fast"
RAY_FIXTURES = {"ray_session"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_ray_in_the_fast_tier(monkeypatch):
    if FAST_TIER:
        import ray

        def refuse(*args, **kwargs):
            pytest.skip("starts Ray: run by `make test`, not by `make test-fast`")

        monkeypatch.setattr(ray, "init", refuse)
    yield


def point_s3_at(monkeypatch, endpoint: str) -> None:
    """Send this test's S3 calls to ``endpoint`` with test credentials and quick failures (1 s timeouts, 2 tries
    per request), and drop the s3fs clients cached for another endpoint."""
    import s3fs

    env = {
        "AWS_ENDPOINT_URL": endpoint, **CREDENTIALS,
        "RAYSEMI_S3_CONNECT_TIMEOUT": "1", "RAYSEMI_S3_READ_TIMEOUT": "1", "RAYSEMI_S3_MAX_ATTEMPTS": "2",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port (``tests/moto_s3.py``); yields its endpoint URL and sets the
    AWS environment in ``os.environ`` for the session (the Ray workers and subprocesses started later inherit it)."""
    pytest.importorskip("moto")
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(moto_s3())
        except MotoStartError as err:
            pytest.fail(str(err))
        old = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        yield server.endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields ``s3://<bucket>``."""
    import s3fs

    name = f"raysemi-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test run (2 CPUs, like the CI machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def covid_dir() -> Path:
    if not COVID.is_dir():
        pytest.skip(f"real data set absent: {COVID}")
    return COVID


@pytest.fixture
def tmp_out(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> str:
    """A small synthetic data set (3 classes x 60 + 60 unlabelled, 32 px), ingested locally."""
    from raysemi.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(root), per_class=60, unlabeled=60, size=32, seed=0)
    return str(root / "dataset")


@pytest.fixture(scope="session")
def demo_dataset_s3(s3_server, demo_dataset, tmp_path_factory) -> str:
    """The same demo images ingested into a bucket on the loopback S3 server."""
    import s3fs

    from raysemi.data.ingest.run import ingest

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("raysemi-demo")
    images = Path(demo_dataset).parent / "images" / "SYNTHETIC-demo"
    from raysemi.data.synthetic import GROUP_REGEX

    ingest(str(images), "s3://raysemi-demo/dataset", group_regex=GROUP_REGEX, seed=0, progress=False)
    return "s3://raysemi-demo/dataset"
