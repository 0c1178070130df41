"""One local Ray cluster for the integration tests: a head and four workers, each worker with one
`expert_slot`, so expert shards must land on distinct nodes.

It starts with the first test that needs it and stops right after the last test of this directory
(not at the end of the whole session), like the e2e server (tests/e2e/conftest.py), so that a later
directory's fixtures that start Ray in this process never meet it. Tests that run Serve on it start
Serve themselves and shut it down at the end of their module."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).parent
_running: list[Callable[[], None]] = []


def _stop() -> None:
    while _running:
        _running.pop()()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201
    yield  # first the item's fixtures end (a module's Serve instance is shut down on the cluster)
    if nextitem is None or HERE not in Path(nextitem.path).parents:
        _stop()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    # Metrics reach each node's export port every 2 s (Ray's default: 10 s), for the tests that
    # read them through Prometheus.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "_system_config": {"metrics_report_interval_ms": 2000}})
    for _ in range(4):
        cluster.add_node(num_cpus=1, resources={"expert_slot": 1})
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=False)

    def stop() -> None:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        cluster.shutdown()

    _running.append(stop)
    yield cluster
    _stop()
