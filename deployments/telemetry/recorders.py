"""What records into the registry of `deployments.telemetry.metrics`: small classes over a
`MetricSet` that hold no Ray state of their own, so the tests drive them with a fake factory.

- `EngineMetrics.observe(EngineSnapshot)`: gauges from the engine's published snapshot, counter
  increments from the growth of its monotonic counters since the previous one, re-form times,
  and the expert series (`ExpertMetrics`).
- `RequestMetrics`: one per request: `on_first_token`, `on_token`, `on_finish(reason)`.
- `ExpertMetrics.observe_token_counts({layer: counts[E]})`: per-(layer, expert) increments and an
  imbalance gauge per layer (max / mean tokens over the experts since the previous observation).
- `VisionMetrics`, `GrpcMetrics`, `AutoscalingMetrics`.

Recording only: nothing here computes an autoscaling input (`deployments.telemetry.signals` does)
or reads an engine (`deployments.telemetry.engine_instrumentation` hands it snapshots).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deployments.telemetry.metrics import MetricSet, default_metric_set

if TYPE_CHECKING:
    from cluster.engine.stats import EngineSnapshot, EngineStats

# Why a request ended. Finish reasons of a completed generation, then the abort causes.
FINISH_REASONS = ("stop", "length", "tool_calls")
ABORT_CAUSES = ("client", "deadline", "error")


# EngineStats field -> counter it feeds (the fields are totals since the engine started).
_STATS_COUNTERS = (
    ("prompt_tokens", "prompt_tokens_total"),
    ("generation_tokens", "generation_tokens_total"),
    ("num_preemptions", "preemptions_total"),
    ("forward_calls", "forward_calls_total"),
    ("prefix_queried_tokens", "prefix_cache_queries_total"),
    ("prefix_cached_tokens", "prefix_cache_hits_total"),
)


class EngineMetrics:
    """Exports an engine's published snapshots. Counters grow by the difference to the previous
    snapshot; a value below the previous one means a new engine (counted from zero again)."""

    def __init__(self, metrics: MetricSet | None = None, transport: str = "local", per_expert: bool = True) -> None:
        self.metrics = metrics or default_metric_set()
        self.experts = ExpertMetrics(self.metrics, per_expert=per_expert, transport=transport)
        self._previous: dict[str, int] = {}
        self._reforms_seen = 0
        self._lock = threading.Lock()

    def observe(self, snapshot: EngineSnapshot) -> None:
        """Everything of one snapshot: stats, re-forms, expert token counts."""
        self.observe_stats(snapshot.stats)
        self.observe_reforms(snapshot.reform_seconds)
        self.experts.observe_token_counts(snapshot.expert_tokens)

    def observe_stats(self, stats: EngineStats) -> None:
        m = self.metrics
        m.set("requests_running", stats.num_running)
        m.set("requests_waiting", stats.num_waiting)
        m.set("kv_blocks_used", stats.kv_blocks_used)
        m.set("kv_blocks_capacity", stats.kv_blocks_total)
        m.set("kv_usage_ratio", stats.kv_usage)
        m.set("prefix_cache_hit_ratio", stats.prefix_hit_rate)
        m.set("prefix_cache_blocks", stats.prefix_cached_blocks)
        with self._lock:
            for field, counter in _STATS_COUNTERS:
                value = int(getattr(stats, field))
                before = self._previous.get(field, 0)
                delta = value - before if value >= before else value
                self._previous[field] = value
                m.inc(counter, delta)

    def observe_reforms(self, reforms: Sequence[float]) -> None:
        """Seconds of every re-form so far (oldest first); records the new ones."""
        with self._lock:
            if len(reforms) < self._reforms_seen:  # a new engine
                self._reforms_seen = 0
            new = list(reforms[self._reforms_seen:])
            self._reforms_seen = len(reforms)
        for seconds in new:
            self.metrics.inc("group_reforms_total")
            self.metrics.observe("group_reform_seconds", seconds)


class RequestMetrics:
    """One request's latencies: create it when the request arrives, call `on_token` as tokens
    stream out (`on_first_token` is implied by the first), and `on_finish` once at the end with
    a finish reason (stop, length, tool_calls) or an abort cause (client, deadline, error)."""

    def __init__(self, metrics: MetricSet | None = None, clock: Callable[[], float] = time.monotonic,
                 start: float | None = None) -> None:
        self.metrics = metrics or default_metric_set()
        self._clock = clock
        self.started = clock() if start is None else start
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens = 0
        self.finished: str | None = None

    def on_first_token(self, now: float | None = None) -> None:
        if self.first_token_at is not None:
            return
        now = self._clock() if now is None else now
        self.first_token_at = self.last_token_at = now
        self.metrics.observe("time_to_first_token_seconds", now - self.started)

    def on_token(self, count: int = 1, now: float | None = None) -> None:
        """`count` new tokens arrived (a streamed chunk may carry several): the gap since the
        previous chunk is spread evenly over them."""
        if count <= 0 or self.finished is not None:
            return
        now = self._clock() if now is None else now
        if self.first_token_at is None:
            self.on_first_token(now)
            count -= 1
            self.tokens += 1
        if count > 0:
            gap = (now - (self.last_token_at or now)) / count
            for _ in range(count):
                self.metrics.observe("inter_token_latency_seconds", gap)
            self.tokens += count
        self.last_token_at = now

    def on_cached_tokens(self, count: int) -> None:
        """An engine request of this request started with `count` prompt tokens from the prefix cache."""
        self.metrics.observe("request_cached_tokens", count)

    def on_finish(self, reason: str) -> None:
        if self.finished is not None:
            return
        self.finished = reason = _reason(reason)
        self.metrics.inc("requests_finished_total", tags={"reason": reason})


def _reason(reason: str | None) -> str:
    """Finish reasons as the API reports them; anything unknown counts as `error` (a bounded set
    of tag values keeps the series count bounded)."""
    reason = (reason or "").lower()
    aliases = {"abort": "client", "cancelled": "client", "canceled": "client", "timeout": "deadline",
               "tool_call": "tool_calls", "eos": "stop", "max_tokens": "length"}
    reason = aliases.get(reason, reason)
    return reason if reason in FINISH_REASONS or reason in ABORT_CAUSES else "error"


def _as_list(counts: Any) -> list[float]:
    if hasattr(counts, "tolist"):  # torch / numpy
        counts = counts.tolist()
    return [float(c) for c in counts]


class ExpertMetrics:
    """Expert load and the exchange: `observe_token_counts` takes the per-layer totals since start
    of an engine snapshot; `per_expert=False` keeps only the imbalance gauges (36 x 128 series per
    engine replica for the real model otherwise)."""

    def __init__(self, metrics: MetricSet | None = None, per_expert: bool = True,
                 transport: str = "local") -> None:
        self.metrics = metrics or default_metric_set()
        self.per_expert = per_expert
        self.transport = transport
        self._previous: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def observe_token_counts(self, counts: Mapping[int, Any]) -> dict[int, float]:
        """Records the growth since the previous call; returns the imbalance per layer that moved."""
        imbalance: dict[int, float] = {}
        for layer, raw in sorted(counts.items()):
            now = _as_list(raw)
            with self._lock:
                before = self._previous.get(layer)
                if before is None or len(before) != len(now) or any(a < b for a, b in zip(now, before, strict=True)):
                    before = [0.0] * len(now)
                self._previous[layer] = now
            delta = [a - b for a, b in zip(now, before, strict=True)]
            if self.per_expert:
                for expert, d in enumerate(delta):
                    self.metrics.inc("expert_tokens_total", d, tags={"layer": str(layer), "expert": str(expert)})
            ratio = imbalance_ratio(delta)
            if ratio is not None:
                imbalance[layer] = ratio
                self.metrics.set("expert_imbalance_ratio", ratio, tags={"layer": str(layer)})
        return imbalance

    def observe_exchange(self, seconds: float) -> None:
        self.metrics.observe("expert_exchange_latency_seconds", seconds, tags={"transport": self.transport})

    def set_shards_health(self, health: Mapping[int, bool]) -> None:
        for rank, up in health.items():
            self.metrics.set("shard_up", 1.0 if up else 0.0, tags={"rank": str(rank)})


def imbalance_ratio(tokens: Sequence[float]) -> float | None:
    """max / mean tokens per expert; None when no token moved."""
    if not tokens:
        return None
    total = float(sum(tokens))
    if total <= 0:
        return None
    return max(tokens) / (total / len(tokens))


class VisionMetrics:
    """Image preprocessing at the ingress and encoder batches in the VisionEncoder deployment (made
    at no cost: the Ray metrics are created on the first record, and the callers swallow its
    errors)."""

    def __init__(self, metrics: MetricSet | None = None) -> None:
        self.metrics = metrics or default_metric_set()

    def observe_preprocess(self, seconds: float) -> None:
        self.metrics.observe("image_preprocess_seconds", seconds)

    def observe_encoder(self, seconds: float) -> None:
        self.metrics.observe("vision_encoder_seconds", seconds)


class GrpcMetrics:
    """gRPC status counts: `method` the RPC name (`Generate`), `code` a status name (`OK`,
    `INVALID_ARGUMENT`, ...) or a `grpc.StatusCode`."""

    def __init__(self, metrics: MetricSet | None = None) -> None:
        self.metrics = metrics or default_metric_set()

    def response(self, method: str, code: Any) -> None:
        name = getattr(code, "name", code)
        self.metrics.inc("grpc_responses_total", tags={"method": method, "code": str(name).upper()})


class AutoscalingMetrics:
    """What the project's autoscaling policies decided and why (recorded in the Serve controller)."""

    def __init__(self, metrics: MetricSet | None = None) -> None:
        self.metrics = metrics or default_metric_set()

    def record(self, application: str, deployment: str, wanted: float, max_replicas: float,
               signals: Mapping[str, float]) -> None:
        tags = {"application": application or "", "deployment": deployment}
        self.metrics.set("autoscaling_wanted_replicas", wanted, tags=tags)
        self.metrics.set("autoscaling_max_replicas", max_replicas, tags=tags)
        for signal, value in signals.items():
            if value is not None and math.isfinite(value):
                self.metrics.set("autoscaling_signal", value, tags={**tags, "signal": signal})
