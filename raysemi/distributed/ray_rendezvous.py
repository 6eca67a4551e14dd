"""The DDP rendezvous of Ray Train workers, kept off the network when the whole Ray runs on this machine.

Ray Train's torch backend rendezvous through torch's ``TCPStore`` on rank 0, which listens on every interface
(``::``) whatever host it is given, and has no authentication; gloo and NCCL then open their own sockets on the
address the host name resolves to. On a cluster those ports must be reachable between nodes (docs/cluster.md
says so). When every node of the Ray is on loopback (the private local Ray of ``ray_session.init_ray``, or a
``ray start --node-ip-address 127.0.0.1``), all workers share this machine, so:

* the rendezvous goes through a ``FileStore`` (``file://`` in the temporary folder: no socket at all), and
* gloo and NCCL are told to use the loopback interface (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``).

Anywhere else Ray Train's own backend runs unchanged. Ray plumbing only; no ML.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

log = logging.getLogger("raysemi")

_RENDEZVOUS_PREFIX = "raysemi-rendezvous-"


def loopback_interface() -> str:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), "lo"))


def ray_is_on_loopback() -> bool:
    """Whether every alive node of the connected Ray has a loopback address (one machine, nothing exposed)."""
    import ray

    addresses = [n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")]
    return bool(addresses) and all(a.startswith("127.") or a in ("::1", "localhost") for a in addresses)


def _use_loopback(interface: str) -> None:
    """On a worker, before the process group exists: gloo's and NCCL's sockets on the loopback interface."""
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ["NCCL_SOCKET_IFNAME"] = interface
    os.environ["MASTER_ADDR"] = "127.0.0.1"


class _LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with a file rendezvous and loopback sockets on a Ray that is all on loopback."""

    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        if not ray_is_on_loopback():
            return super().on_start(worker_group, backend_config)
        import ray

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        # A new file per start: a FileStore file left by a failed group would confuse the next one.
        store = os.path.join(tempfile.gettempdir(), f"{_RENDEZVOUS_PREFIX}{uuid.uuid4().hex}")
        self._store = store
        worker_group.execute(_use_loopback, interface=loopback_interface())
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                              world_size=len(worker_group), init_method=f"file://{store}",
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])
        log.debug("process group (%s, %d workers) through %s", backend, len(worker_group), store)

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        store = getattr(self, "_store", None)
        if store and os.path.exists(store):  # FileStore removes it itself when every rank closed cleanly
            with contextlib.suppress(OSError):
                os.remove(store)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend keeps the rendezvous off the network when the Ray is all on loopback."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
