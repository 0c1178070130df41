"""Starting a local Ray cluster with Serve's HTTP and gRPC proxies and deploying applications:
shared by `moe-cluster serve` and the end-to-end tests."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Sequence

from cluster.errors import ClusterError
from deployments.app import build_app, grpc_options, http_options
from deployments.config import AppConfig

# Read by Serve's proxy at import: the proxy's gRPC server limit for messages both ways. The proxy
# inherits the environment of the raylet this process starts.
GRPC_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"


class PortInUseError(ClusterError):
    """A port the server needs is taken (a stale server would silently share it)."""


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Binds each port once, without SO_REUSEPORT (which Serve's proxies set, so that a second
    server on the same port would start and split the traffic instead of failing), but with
    SO_REUSEADDR: the connections of a server stopped a moment ago sit in TIME_WAIT, which must not
    refuse a restart, while a live listener still does."""
    for name, port in ports.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        bind_host = "" if name == "gRPC" else host  # Serve's gRPC proxy listens on every interface
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise PortInUseError(f"{name} port {port} is already in use (is another server running?); "
                                         f"stop it or choose another port with --{name.lower()}-port") from None
                raise


def start_ray_and_serve(config: AppConfig, num_cpus: int | None = None) -> None:
    """A fresh in-process Ray cluster with Serve's proxies on the configured ports."""
    import ray
    from ray import serve

    os.environ[GRPC_MESSAGE_ENV] = str(config.grpc_max_message_bytes)
    # address="local": always a new cluster, never one that happens to run on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    serve.start(http_options=http_options(config), grpc_options=grpc_options(config))


def deploy(configs: Sequence[AppConfig]) -> None:
    """Deploys the applications together and waits until all are running."""
    from ray import serve
    from ray.serve import RunTarget

    serve.run_many([RunTarget(target=build_app(c), name=c.app_name, route_prefix=c.route_prefix)
                    for c in configs])


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
