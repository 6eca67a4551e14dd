"""Starting Ray: a Ray that cannot start or be reached is one line (RaysemiError), not Ray's traceback."""

from __future__ import annotations

import contextlib

import pytest

from raysemi import ray_utils
from raysemi.errors import RaysemiError


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
    monkeypatch.setattr(ray_utils, "_loopback_node", contextlib.nullcontext, raising=False)  # env left alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return shutdowns


def test_ray_that_cannot_start_is_one_line(failing_ray_init):
    with pytest.raises(RaysemiError, match="Ray could not start on this machine: The current node timed out") as err:
        ray_utils.init_ray()
    assert "\n" not in str(err.value)
    assert failing_ray_init == [True]  # what a half-started Ray left is shut down


def test_cluster_that_cannot_be_reached_is_one_line(failing_ray_init):
    with pytest.raises(RaysemiError, match="cannot attach to the Ray cluster at 10.0.0.5:6379: The current node"):
        ray_utils.init_ray("10.0.0.5:6379")
