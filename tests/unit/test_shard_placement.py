"""The refusal of an expert placement the cluster cannot hold: one line naming the bundles asked
for and, for each resource they name, how much is free of how much there is."""

from __future__ import annotations

from cluster.errors import ConfigError
from cluster.experts.shard_placement import PlacementError, placement_refusal


def test_refusal_names_what_was_asked_and_what_is_free() -> None:
    message = placement_refusal(2, {"expert_slot": 1, "CPU": 0.01}, "STRICT_SPREAD", 45.0,
                                free={"CPU": 0.0, "expert_slot": 1.0, "memory": 1e9},
                                total={"CPU": 2.0, "expert_slot": 4.0, "memory": 2e9})
    assert "\n" not in message
    assert "cannot place 2 expert shards within 45s" in message
    assert "2 x {expert_slot: 1, CPU: 0.01} on distinct nodes (STRICT_SPREAD)" in message
    assert "free now: expert_slot 1 of 4, CPU 0 of 2" in message
    assert "memory" not in message  # only the resources asked for


def test_a_packed_refusal_and_a_resource_the_cluster_lacks() -> None:
    message = placement_refusal(3, {"CPU": 0.01}, "PACK", 5.0, free={}, total={})
    assert "3 x {CPU: 0.01} (PACK)" in message and "free now: CPU 0 of 0" in message
    assert issubclass(PlacementError, ConfigError)  # the CLI prints it in one line and exits 2
