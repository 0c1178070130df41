"""Where expert shards go: one placement-group bundle per shard, on distinct `expert_slot` nodes
(STRICT_SPREAD) when the cluster has enough of them, else packed wherever they fit. A placement
that cannot be had within its timeout is refused with a `PlacementError` naming what was asked
and what is free, instead of waiting forever."""

from __future__ import annotations

import logging
from typing import Any

from cluster.errors import ConfigError

log = logging.getLogger(__name__)
EXPERT_SLOT = "expert_slot"
SHARD_CPUS = 0.01  # a shard's own CPU ask: it computes on its node's cores (torch threads), not on a reserved one


class PlacementError(ConfigError):
    """The cluster cannot hold the expert shards' placement group (now, or within the timeout)."""


def shard_bundle(distinct: bool, gpus_per_shard: float = 0.0) -> dict[str, float]:
    """One shard's bundle: an expert slot when the shards spread over distinct nodes, its CPU
    ask, and its GPUs when it computes on them (the shard actor asks for the same)."""
    bundle = {EXPERT_SLOT: 1.0, "CPU": SHARD_CPUS} if distinct else {"CPU": SHARD_CPUS}
    if gpus_per_shard > 0:
        bundle["GPU"] = gpus_per_shard
    return bundle


def shard_placement_group(num_shards: int, timeout_s: float, require_distinct_nodes: bool | None = None,
                          name: str = "", gpus_per_shard: float = 0.0) -> Any:
    """A ready placement group with one bundle per shard; PlacementError (and nothing left
    behind) when it is not placed within `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    slots = int(ray.cluster_resources().get(EXPERT_SLOT, 0))
    distinct = slots >= num_shards
    if require_distinct_nodes and not distinct:
        raise ConfigError(f"{num_shards} expert shards need {num_shards} nodes with an "
                          f"'{EXPERT_SLOT}' resource; the cluster has {slots}")
    if not distinct:
        log.warning("cluster has %d '%s' resources for %d shards: shards may share nodes", slots, EXPERT_SLOT,
                    num_shards)
    bundle = shard_bundle(distinct, gpus_per_shard)
    strategy = "STRICT_SPREAD" if distinct else "PACK"
    pg = placement_group([bundle] * num_shards, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(placement_refusal(num_shards, bundle, strategy, timeout_s, ray.available_resources(),
                                               ray.cluster_resources()))
    return pg


def placement_refusal(num_shards: int, bundle: dict[str, float], strategy: str, timeout_s: float,
                      free: dict[str, float], total: dict[str, float]) -> str:
    """One line: the bundles asked for, and how much of each resource they name is free."""
    asked = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    spread = " on distinct nodes" if strategy == "STRICT_SPREAD" else ""
    have = ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g}" for k in bundle)
    return (f"cannot place {num_shards} expert shards within {timeout_s:g}s: asked for {num_shards} x "
            f"{{{asked}}}{spread} ({strategy}); free now: {have}. Free some (fewer or smaller replicas), "
            f"add nodes, or ask for fewer expert shards")
