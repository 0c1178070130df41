"""An expert placement the cluster cannot hold is refused within its timeout with a
`PlacementError` that names the bundles asked for and the resources free, and leaves nothing
behind (the placement group it waited for is removed, no registry or shard was started)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.state import list_actors

from cluster.engine.engine_config import EngineConfig
from cluster.experts.group import ExpertGroup, GroupSpec
from cluster.experts.shard_placement import EXPERT_SLOT, PlacementError


def _live_groups() -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def _expert_actors() -> set[str]:
    return {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if a.class_name in ("ShardWorker", "ShardRegistry", "EngineWorker")}


def test_an_unplaceable_group_is_refused_with_what_was_asked_and_what_is_free(expert_nodes: int,
                                                                              tiny_ckpt: Path) -> None:
    hold = placement_group([{EXPERT_SLOT: 1}])  # one expert node taken: the shards cannot spread over all four
    ray.get(hold.ready(), timeout=120)
    before = (_live_groups(), _expert_actors())
    spec = GroupSpec(str(tiny_ckpt), expert_nodes, "ray", EngineConfig(), placement_timeout_s=3)
    try:
        with pytest.raises(PlacementError) as refused:
            ExpertGroup(spec)
        deadline = time.monotonic() + 30
        while (_live_groups(), _expert_actors()) != before:
            assert time.monotonic() < deadline, "the refused placement left something behind"
            time.sleep(0.2)
    finally:
        remove_placement_group(hold)
    message = str(refused.value)
    assert "\n" not in message
    assert f"cannot place {expert_nodes} expert shards within 3s" in message
    assert f"{expert_nodes} x {{{EXPERT_SLOT}: 1, CPU: 0.01}} on distinct nodes (STRICT_SPREAD)" in message
    assert f"{EXPERT_SLOT} {expert_nodes - 1} of {expert_nodes}" in message
