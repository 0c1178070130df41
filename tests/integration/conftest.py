"""One local Ray cluster per test session: a head and four workers, each worker with one
`expert_slot`, so expert shards must land on distinct nodes."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(4):
        cluster.add_node(num_cpus=1, resources={"expert_slot": 1})
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    cluster.shutdown()
