"""Starting a local Ray cluster with Serve's HTTP and gRPC proxies and deploying applications:
shared by `moe-cluster serve` and the end-to-end tests."""

from __future__ import annotations

import ast
import errno
import logging
import os
import re
import socket
import time
from collections.abc import Sequence

from cluster.errors import ClusterError
from cluster.experts.shard_placement import PlacementError
from deployments.app import build_app, grpc_options, http_options
from deployments.config import AppConfig

# Read by Serve's proxy at import: the proxy's gRPC server limit for messages both ways. The proxy
# inherits the environment of the raylet this process starts.
GRPC_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# How a deployment's status message carries a PlacementError raised where its expert shards are placed,
# and how Serve says that replicas wait for resources (after RAY_SERVE_SLOW_STARTUP_WARNING_S, 30 s).
_PLACEMENT_REFUSED = re.compile(r"PlacementError: ([^\n]+)")
_UNSCHEDULED = re.compile(r"has (\d+) replicas that have taken more than \d+s to be scheduled\..*Resources required "
                          r"for each replica: (.*?), total resources available: (.*?)\. Use", re.DOTALL)


def _short(asked: str, free: str) -> bool:
    """Whether Serve's report shows a replica asking for more of a resource than is free (not just
    a worker process that is slow to start on a busy machine)."""
    try:
        need, have = ast.literal_eval(asked), ast.literal_eval(free)
        return any(amount > have.get(resource, 0.0) for resource, amount in need.items())
    except (ValueError, SyntaxError, AttributeError, TypeError):
        return False


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


def deploy(configs: Sequence[AppConfig], refuse_unscheduled: bool = False) -> None:
    """Deploys the applications together and waits until all are running (see `wait_running`)."""
    from ray import serve
    from ray.serve import RunTarget

    serve.run_many([RunTarget(target=build_app(c), name=c.app_name, route_prefix=c.route_prefix)
                    for c in configs], wait_for_applications_running=False)
    wait_running([c.app_name for c in configs], refuse_unscheduled)


def wait_running(names: Sequence[str], refuse_unscheduled: bool = False) -> None:
    """Until every named application runs. RuntimeError (as serve.run) when one fails to deploy; a
    PlacementError as soon as a deployment reports that its expert shards cannot be placed, where
    Serve would retry that placement for many minutes before giving up. `refuse_unscheduled`
    (a cluster of fixed size, as `moe-cluster serve` starts: nothing will come to free resources):
    a PlacementError too once Serve reports replicas waiting for resources."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    pending = list(names)
    while pending:
        apps = serve.status().applications
        for name in list(pending):
            app = apps.get(name)
            if app is None:
                raise RuntimeError(f"Waiting for application {name} to be RUNNING, but it does not exist.")
            for deployment_name, deployment in app.deployments.items():
                if (refused := _PLACEMENT_REFUSED.search(deployment.message)) is not None:
                    raise PlacementError(refused.group(1))
                waiting = _UNSCHEDULED.search(deployment.message) if refuse_unscheduled else None
                if waiting is not None and _short(*waiting.groups()[1:]):
                    count, asked, free = waiting.groups()
                    raise PlacementError(f"cannot place {count} replica(s) of {deployment_name} (application "
                                         f"{name}): each asks for {asked}; free now: {free}. Free some, lower the "
                                         "replicas' num_cpus / num_gpus, or give the cluster more (--num-cpus)")
            if app.status == ApplicationStatus.RUNNING:
                pending.remove(name)
            elif app.status == ApplicationStatus.DEPLOY_FAILED:
                raise RuntimeError(f"Deploying application {name} failed: {app.message}")
        if pending:
            time.sleep(0.2)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
