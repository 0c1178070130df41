"""The test session's one local Ray cluster, and Serve on it, shared by every directory.

Nothing starts until a test asks for it (the fixtures in tests/conftest.py), whichever directory
that test is in, and everything stops at the end of the session:

- `cluster()`: a head node (2 CPUs) with the driver connected to it;
- `expert_nodes()`: four worker nodes with one `expert_slot` each, added to that cluster only for
  the tests of expert parallelism, so that expert shards land on distinct nodes;
- `serve(http_options, grpc_options)`: Serve on that cluster with these proxies (on the head node
  only). One Serve instance runs at a time: a test module that needs other ports restarts it, and
  `serve_generation` changes, so that the e2e server knows to deploy its applications again.
"""

from __future__ import annotations

import os
import socket
from typing import Any

# The gRPC proxy's transport limit, read by Serve's proxy from the environment of the raylet that
# starts it (deployments/launch.py): set before the head node starts, for the whole session.
PROXY_GRPC_MAX_MESSAGE_BYTES = 1024 * 1024
EXPERT_NODES = 4


def free_port() -> int:
    """A port free on every interface (Serve's gRPC proxy binds them all, and the session's Ray
    processes listen on the node's address)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RaySession:
    def __init__(self) -> None:
        self._cluster: Any = None
        self._expert_nodes = 0
        self._serve_options: tuple[str, str] | None = None
        self.serve_generation = 0

    def cluster(self) -> Any:
        """The session's `ray.cluster_utils.Cluster`, started on first use."""
        if self._cluster is None:
            import ray
            from ray.cluster_utils import Cluster

            from deployments.launch import GRPC_MESSAGE_ENV

            if ray.is_initialized():
                raise RuntimeError("Ray was started outside tests/ray_session.py: tests share the session's cluster")
            os.environ[GRPC_MESSAGE_ENV] = str(PROXY_GRPC_MAX_MESSAGE_BYTES)
            # Metrics reach each node's export port every 2 s (Ray's default: 10 s), for the tests
            # that read them through Prometheus.
            # The dashboard (the state API) on a free port: another Ray on this machine may hold 8265.
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 2, "dashboard_port": free_port(), "_system_config": {"metrics_report_interval_ms": 2000}})
            os.environ["RAY_ADDRESS"] = cluster.address  # what a library's own ray.init() joins
            ray.init(address=cluster.address, log_to_driver=False)
            self._cluster = cluster
        return self._cluster

    def expert_nodes(self) -> int:
        """Adds the worker nodes with an `expert_slot` (once); returns how many there are."""
        cluster = self.cluster()
        while self._expert_nodes < EXPERT_NODES:
            cluster.add_node(num_cpus=1, resources={"expert_slot": 1})
            self._expert_nodes += 1
        cluster.wait_for_nodes()
        return self._expert_nodes

    def serve(self, http_options: dict[str, Any], grpc_options: Any) -> int:
        """Serve running with these proxy options (restarted if others run); its generation."""
        from ray import serve

        key = (repr(sorted(http_options.items())), repr(grpc_options))
        if key != self._serve_options:
            self.cluster()
            self.stop_serve()
            serve.start(proxy_location="HeadOnly", http_options=http_options, grpc_options=grpc_options)
            self._serve_options = key
            self.serve_generation += 1
        return self.serve_generation

    def serving(self, generation: int) -> bool:
        """Whether the Serve instance of this generation still runs."""
        return self._serve_options is not None and generation == self.serve_generation

    def stop_serve(self) -> None:
        if self._serve_options is not None:
            from ray import serve

            self._serve_options = None
            serve.shutdown()

    def stop(self) -> None:
        if self._cluster is None:
            return
        import ray

        from deployments.launch import GRPC_MESSAGE_ENV

        try:
            self.stop_serve()
        finally:
            ray.shutdown()
            self._cluster.shutdown()
            self._cluster, self._expert_nodes = None, 0
            os.environ.pop("RAY_ADDRESS", None)
            os.environ.pop(GRPC_MESSAGE_ENV, None)
