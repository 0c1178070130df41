"""The autoscaling signals an engine replica reports, computed once, here: the engine server's
`record_autoscaling_stats()` returns them (through `deployments.telemetry.instrumentation`) and
the policies in `deployments.telemetry.autoscaling` read them by the same keys. Plain Python over
the engine's published snapshot: no torch, no Ray, nothing from the other telemetry modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.engine.stats import KVLoad

# Keys of the stats that replicas report through `record_autoscaling_stats()`.
KV_USAGE_KEY = "kv_usage"  # KV blocks used / total, 0..1
WAITING_KEY = "num_waiting"  # sequences waiting for admission
RUNNING_KEY = "num_running"  # sequences in the running batch
EXPERT_LOAD_KEY = "expert_load"  # routed (token, expert) assignments per second per shard
EXCHANGE_LATENCY_KEY = "exchange_latency_s"  # mean seconds of one MoE layer's exchange


def kv_signals(load: KVLoad) -> dict[str, float]:
    """KV blocks used / total, waiting and running sequences, from the KV load the engine loop
    publishes after every change (floats: Serve checks the types)."""
    total = load.total_blocks
    kv_usage = (total - load.free_blocks) / total if total else 0.0
    return {KV_USAGE_KEY: float(kv_usage), WAITING_KEY: float(load.num_waiting), RUNNING_KEY: float(load.num_running)}


@dataclass(frozen=True)
class ExchangeTotals:
    """Expert exchanges timed since the engine started, and their seconds (`TimedDispatcher`)."""

    count: int = 0
    seconds: float = 0.0


def routed_pairs(expert_tokens: Mapping[int, Any]) -> float:
    """All routed (token, expert) pairs of a snapshot's per-layer counts ([E] each)."""
    return float(sum(float(counts.sum()) if hasattr(counts, "sum") else float(sum(counts))
                     for counts in expert_tokens.values()))


class ExpertSignals:
    """Turns cumulative totals into the expert signals of one report: routed assignments per second
    per shard and the mean exchange latency, both since the previous `update` (0 when the engine
    was idle; totals that went down mean a new engine). The first report has none: a rate needs
    two readings, and a replica that just started must not pull the mean down."""

    def __init__(self, num_shards: int = 1) -> None:
        self.num_shards = max(1, num_shards)
        self._last: tuple[float, ExchangeTotals, float] | None = None

    def update(self, pairs: float, exchanges: ExchangeTotals, now: float) -> dict[str, float]:
        last, self._last = self._last, (pairs, exchanges, now)
        if last is None:
            return {}
        last_pairs, last_exchanges, last_now = last
        load = latency = 0.0
        if now > last_now and pairs >= last_pairs:
            load = (pairs - last_pairs) / (now - last_now) / self.num_shards
        count = exchanges.count - last_exchanges.count
        if count > 0:
            latency = (exchanges.seconds - last_exchanges.seconds) / count
        return {EXPERT_LOAD_KEY: float(load), EXCHANGE_LATENCY_KEY: float(latency)}
