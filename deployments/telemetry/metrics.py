"""The cluster's own Prometheus series, exported through Ray's metrics pipeline: the registry.

Only what Ray Serve does not export already: Serve counts requests and their latency per
deployment and per route (`ray_serve_num_http_requests_total`, `ray_serve_http_request_latency_ms`,
`ray_serve_deployment_processing_latency_ms`, ...), so the project adds the engine's state, token
timing, finish reasons, the expert exchange, images and the autoscaling policies' decisions, which
Serve cannot see, and gRPC status codes, which Serve's proxy records as OK for a unary call that
answered with an error code on its context.

Every series is defined once in `METRICS` (name, kind, description, tags, buckets): that registry
creates the Ray metrics (`ray.serve.metrics` inside Serve replicas, which adds the `deployment`,
`replica` and `application` tags; `ray.util.metrics` elsewhere) through a `MetricSet`, renders the
table in `docs/OPERATIONS.md` (`python -m deployments.telemetry.metrics`), and is what the tests
hold the docs, the alert rules and the dashboards to. Ray exports a metric named `moe_cluster_x` as
`ray_moe_cluster_x`. What records into it: `deployments.telemetry.recorders`.

Nothing here imports torch or starts Ray: metrics are created lazily, on first record.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "moe_cluster_"
RAY_PREFIX = "ray_"
# Tags that ray.serve.metrics adds inside a replica; our own tags must not use them, except on the
# autoscaler's series (recorded in the Serve controller, outside any replica), which join with
# Serve's own `ray_serve_autoscaling_*` series on exactly these names.
SERVE_TAGS = ("deployment", "replica", "application")

Kind = Literal["counter", "gauge", "histogram"]

# Bucket boundaries, seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
EXCHANGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
IMAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
VISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REFORM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CACHED_TOKEN_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)



@dataclass(frozen=True)
class MetricDef:
    """One series. `name` is what the code registers with Ray (with `PREFIX`); Prometheus sees
    `exported` (Ray adds `ray_`). Counters are named with `_total`, which Ray then keeps as is."""

    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    recorder: str = "engine"  # the component that records it (documentation)

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric {self.name!r} must start with {PREFIX!r}")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name!r}: counters, and only counters, end with _total")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name!r}: histograms, and only histograms, have buckets")
        if list(self.buckets) != sorted(set(self.buckets)) or any(b <= 0 for b in self.buckets):
            raise ValueError(f"metric {self.name!r}: buckets must be positive and increasing")

    @property
    def exported(self) -> str:
        return RAY_PREFIX + self.name


def _m(name: str, kind: Kind, description: str, tags: tuple[str, ...] = (), buckets: tuple[float, ...] = (),
       recorder: str = "engine") -> MetricDef:
    return MetricDef(PREFIX + name, kind, description, tags, buckets, recorder)


METRICS: tuple[MetricDef, ...] = (
    # Engine (EngineServer replica), from the engine's published snapshots.
    _m("requests_running", "gauge", "Sequences in the engine's running batch."),
    _m("requests_waiting", "gauge", "Sequences waiting for admission (KV blocks or batch slots)."),
    _m("kv_blocks_used", "gauge", "Paged KV cache blocks in use."),
    _m("kv_blocks_capacity", "gauge", "Paged KV cache blocks of the replica (used + free)."),
    _m("kv_usage_ratio", "gauge", "KV blocks used / total (0..1): what the engine autoscaling policy scales on."),
    _m("prompt_tokens_total", "counter", "Prompt tokens admitted."),
    _m("generation_tokens_total", "counter", "Tokens generated."),
    _m("preemptions_total", "counter", "Sequences preempted (KV blocks freed, recomputed later)."),
    _m("forward_calls_total", "counter", "Model forward passes (engine steps that ran the model)."),
    _m("prefix_cache_queries_total", "counter",
       "Prompt tokens looked up in the prefix cache (each admission of a sequence from scratch)."),
    _m("prefix_cache_hits_total", "counter",
       "Of those, tokens found cached and not prefilled (hit rate: rate(hits) / rate(queries))."),
    _m("prefix_cache_hit_ratio", "gauge", "Prefix cache hits / queries since the engine started (0..1)."),
    _m("prefix_cache_blocks", "gauge", "KV blocks findable in the prefix cache (held or free)."),
    _m("group_reforms_total", "counter", "Expert-parallel group re-formations after a failed exchange."),
    _m("group_reform_seconds", "histogram", "Time one expert-parallel group re-formation took.",
       buckets=REFORM_BUCKETS),
    # Requests (ingress), one RequestMetrics per request. Serve's ray_serve_*_request_latency_ms
    # has the end-to-end latency per route and status.
    _m("time_to_first_token_seconds", "histogram", "Request arrival to its first generated token.",
       buckets=TTFT_BUCKETS, recorder="ingress"),
    _m("inter_token_latency_seconds", "histogram", "Gap between consecutive generated tokens of a request.",
       buckets=ITL_BUCKETS, recorder="ingress"),
    _m("request_cached_tokens", "histogram", "Prompt tokens of one engine request that the prefix cache gave.",
       buckets=CACHED_TOKEN_BUCKETS, recorder="ingress"),
    _m("requests_finished_total", "counter",
       "Requests ended, by reason: stop, length, tool_calls, or an abort cause (client, deadline, error).",
       tags=("reason",), recorder="ingress"),
    # Expert parallelism.
    _m("expert_exchange_latency_seconds", "histogram",
       "One MoE layer's token exchange (dispatch + expert compute + combine) as the engine sees it.",
       tags=("transport",), buckets=EXCHANGE_BUCKETS),
    _m("expert_tokens_total", "counter", "Routed (token, expert) assignments, per MoE layer and expert.",
       tags=("layer", "expert")),
    _m("expert_imbalance_ratio", "gauge",
       "Per MoE layer: tokens of the busiest expert / mean tokens per expert, since the previous "
       "observation (1 = perfectly balanced).", tags=("layer",)),
    _m("shard_up", "gauge", "Expert shard health as the engine's dispatcher sees it: 1 up, 0 down.",
       tags=("rank",)),
    # gRPC status: Serve's ray_serve_num_grpc_requests_total counts a unary call that set an error
    # code on its context (how the ingress refuses) as OK; HTTP statuses are Serve's alone.
    _m("grpc_responses_total", "counter",
       "gRPC calls by method and the status code name the ingress answered with (DEADLINE_EXCEEDED: cancelled "
       "at the client's deadline).", tags=("method", "code"), recorder="ingress"),
    # Images.
    _m("image_preprocess_seconds", "histogram", "Fetch, check, decode and resize of one image.",
       buckets=IMAGE_BUCKETS, recorder="ingress"),
    _m("vision_encoder_seconds", "histogram", "One vision encoder batch (all images of the batch).",
       buckets=VISION_BUCKETS, recorder="vision"),
    # Autoscaling (recorded by the project's policies in the Serve controller).
    _m("autoscaling_wanted_replicas", "gauge",
       "Replicas the policy wants before its bounds (above max_replicas: at the ceiling).",
       tags=("application", "deployment"), recorder="controller"),
    _m("autoscaling_max_replicas", "gauge", "The policy's upper bound of replicas.",
       tags=("application", "deployment"), recorder="controller"),
    _m("autoscaling_signal", "gauge",
       "The policy's inputs, averaged over replicas: kv_usage, num_waiting, expert_load, exchange_latency_s.",
       tags=("application", "deployment", "signal"), recorder="controller"),
)

METRICS_BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}
if len(METRICS_BY_NAME) != len(METRICS):  # pragma: no cover - a definition error
    raise RuntimeError("duplicate metric names")


def metric(name: str) -> MetricDef:
    """A definition by name, with or without the prefixes."""
    key = name.removeprefix(RAY_PREFIX)
    key = key if key.startswith(PREFIX) else PREFIX + key
    return METRICS_BY_NAME[key]


# ---------------------------------------------------------------------------------------------
# Creating metrics
# ---------------------------------------------------------------------------------------------

MetricFactory = Callable[[MetricDef], Any]


def ray_metric_factory(definition: MetricDef) -> Any:
    """Creates the Ray metric of a definition: `ray.serve.metrics` (adds the replica's deployment,
    replica and application tags inside a replica) unless the definition uses those tags itself."""
    if any(t in SERVE_TAGS for t in definition.tags):
        from ray.util import metrics as mod
    else:
        # ray.util's classes with Serve's tags added; checked against ray.util's, as Serve's annotate
        # tag_keys as a 1-tuple
        from ray.serve import metrics as mod  # type: ignore[no-redef]  # as above
    tags = definition.tags or None
    if definition.kind == "counter":
        return mod.Counter(definition.name, description=definition.description, tag_keys=tags)
    if definition.kind == "gauge":
        return mod.Gauge(definition.name, description=definition.description, tag_keys=tags)
    return mod.Histogram(definition.name, description=definition.description,
                         boundaries=list(definition.buckets), tag_keys=tags)


class MetricSet:
    """The created metrics of one process, made on first use from `METRICS`. Thread-safe: the
    engine loop and the asyncio loop both record."""

    def __init__(self, factory: MetricFactory = ray_metric_factory) -> None:
        self._factory = factory
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        definition = metric(name)
        made = self._made.get(definition.name)
        if made is None:
            with self._lock:
                made = self._made.get(definition.name)
                if made is None:
                    made = self._made[definition.name] = self._factory(definition)
        return made

    def inc(self, name: str, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if value > 0:  # Ray refuses increments <= 0
            self.get(name).inc(value, tags=_check_tags(name, tags))

    def set(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self.get(name).set(float(value), tags=_check_tags(name, tags))

    def observe(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self.get(name).observe(max(0.0, float(value)), tags=_check_tags(name, tags))


def _check_tags(name: str, tags: dict[str, str] | None) -> dict[str, str] | None:
    definition = metric(name)
    given = tuple(sorted(tags or {}))
    if given != tuple(sorted(definition.tags)):
        raise ValueError(f"{definition.name} takes tags {definition.tags}, got {given}")
    return {k: str(v) for k, v in tags.items()} if tags else None


_default: MetricSet | None = None
_default_lock = threading.Lock()


def default_metric_set() -> MetricSet:
    """The process-wide set of Ray metrics (one per replica process)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MetricSet()
        return _default


# ---------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------

TABLE_BEGIN = "<!-- metrics-table:begin (generated by `python -m deployments.telemetry.metrics`; do not edit) -->"
TABLE_END = "<!-- metrics-table:end -->"


def render_table() -> str:
    """The markdown table of every series, as it stands in docs/OPERATIONS.md."""
    lines = ["| Series | Type | Tags | Recorded by | Description |", "| --- | --- | --- | --- | --- |"]
    for m in METRICS:
        tags = ", ".join(f"`{t}`" for t in m.tags) or "-"
        unit = " tokens" if m.name.endswith("_tokens") else " s"
        kind = m.kind if m.kind != "histogram" else "histogram (" + ", ".join(f"{b:g}" for b in m.buckets) + unit + ")"
        lines.append(f"| `{m.exported}` | {kind} | {tags} | {m.recorder} | {m.description} |")
    return "\n".join([TABLE_BEGIN, *lines, TABLE_END])


if __name__ == "__main__":
    print(render_table())
