"""deployments/telemetry/metrics.py and recorders.py without Ray: a fake factory records what the Ray
metrics would get."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from cluster.engine.stats import EngineSnapshot, EngineStats, KVLoad
from deployments.telemetry import metrics as dm
from deployments.telemetry.metrics import METRICS, MetricDef, MetricSet
from deployments.telemetry.recorders import (
    AutoscalingMetrics,
    EngineMetrics,
    ExpertMetrics,
    GrpcMetrics,
    RequestMetrics,
    VisionMetrics,
)

ROOT = Path(__file__).resolve().parents[2]


class FakeMetric:
    def __init__(self, definition: MetricDef) -> None:
        self.definition = definition
        self.total: dict[tuple, float] = defaultdict(float)  # counter sums
        self.value: dict[tuple, float] = {}  # gauge values
        self.observed: dict[tuple, list[float]] = defaultdict(list)

    @staticmethod
    def _key(tags):
        return tuple(sorted((tags or {}).items()))

    def inc(self, value=1.0, tags=None):
        assert self.definition.kind == "counter" and value > 0
        self.total[self._key(tags)] += value

    def set(self, value, tags=None):
        assert self.definition.kind == "gauge"
        self.value[self._key(tags)] = value

    def observe(self, value, tags=None):
        assert self.definition.kind == "histogram" and value >= 0
        self.observed[self._key(tags)].append(value)


class FakeFactory:
    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}

    def __call__(self, definition: MetricDef) -> FakeMetric:
        assert definition.name not in self.made, "a metric is created once per process"
        self.made[definition.name] = FakeMetric(definition)
        return self.made[definition.name]

    def __getitem__(self, short: str) -> FakeMetric:
        return self.made[dm.PREFIX + short]


@pytest.fixture
def fake():
    factory = FakeFactory()
    return factory, MetricSet(factory)


def stats(**kw) -> EngineStats:
    base = dict(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=100, num_preemptions=0,
                forward_calls=0, prompt_tokens=0, generation_tokens=0, aborts=0)
    base.update(kw)
    return EngineStats(**base)


def documented_series(markdown: str) -> list[str]:
    """Series names in the first column of the generated metrics table of a markdown text."""
    if dm.TABLE_BEGIN not in markdown or dm.TABLE_END not in markdown:
        return []
    body = markdown.split(dm.TABLE_BEGIN, 1)[1].split(dm.TABLE_END, 1)[0]
    names = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("`ray_"):
            names.append(cells[0].strip("`"))
    return names


def test_registry_is_consistent():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert m.name.startswith("moe_cluster_") and m.exported == "ray_" + m.name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", m.name)
        assert not set(m.tags) & {"replica"}, "ray.serve.metrics adds the replica tag itself"
    required = {"requests_running", "requests_waiting", "time_to_first_token_seconds", "inter_token_latency_seconds",
                "prompt_tokens_total", "generation_tokens_total", "kv_blocks_used", "kv_blocks_capacity",
                "kv_usage_ratio", "preemptions_total", "requests_finished_total", "expert_exchange_latency_seconds",
                "expert_tokens_total", "expert_imbalance_ratio", "shard_up", "image_preprocess_seconds",
                "vision_encoder_seconds", "grpc_responses_total"}
    assert required <= {n.removeprefix("moe_cluster_") for n in names}
    # What Ray Serve exports itself (HTTP status counts and end-to-end latency per route) is not
    # duplicated, nor is one series that another already carries (aborts: finish reasons).
    assert not {"http_responses_total", "e2e_request_latency_seconds", "aborts_total"} & {
        n.removeprefix("moe_cluster_") for n in names}
    assert dm.metric("requests_finished_total").tags == ("reason",)
    assert dm.metric("ray_moe_cluster_expert_tokens_total").tags == ("layer", "expert")


def test_bad_definitions_are_refused():
    with pytest.raises(ValueError):
        MetricDef("other_x", "gauge", "")
    with pytest.raises(ValueError):
        MetricDef("moe_cluster_x", "counter", "")  # counters end with _total
    with pytest.raises(ValueError):
        MetricDef("moe_cluster_x_seconds", "histogram", "", buckets=(1.0, 0.5))


def test_every_metric_is_documented_and_only_those():
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    documented = documented_series(text)
    assert sorted(documented) == sorted(m.exported for m in METRICS)
    assert dm.render_table() in text, "the table is stale: regenerate it with `python -m deployments.telemetry.metrics`"


def test_tags_are_checked(fake):
    _, ms = fake
    with pytest.raises(ValueError):
        ms.inc("requests_finished_total", tags={"cause": "client"})
    with pytest.raises(ValueError):
        ms.set("requests_running", 1, tags={"rank": "0"})


def test_engine_snapshot_counters_become_increments(fake):
    factory, ms = fake
    em = EngineMetrics(ms)
    em.observe_stats(stats(num_running=3, num_waiting=2, kv_blocks_used=40, prompt_tokens=100, generation_tokens=5,
                           forward_calls=2))
    assert factory["requests_running"].value[()] == 3
    assert factory["requests_waiting"].value[()] == 2
    assert factory["kv_blocks_used"].value[()] == 40
    assert factory["kv_blocks_capacity"].value[()] == 100
    assert factory["kv_usage_ratio"].value[()] == pytest.approx(0.4)
    assert factory["prompt_tokens_total"].total[()] == 100
    em.observe_stats(stats(prompt_tokens=130, generation_tokens=25, num_preemptions=1, forward_calls=10))
    em.observe_stats(stats(prompt_tokens=130, generation_tokens=25, num_preemptions=1, forward_calls=10))  # no change
    assert factory["prompt_tokens_total"].total[()] == 130
    assert factory["generation_tokens_total"].total[()] == 25
    assert factory["preemptions_total"].total[()] == 1
    assert factory["forward_calls_total"].total[()] == 10
    assert factory["requests_running"].value[()] == 0
    # A new engine starts its counters from zero again: its values count in full.
    em.observe_stats(stats(prompt_tokens=7, generation_tokens=30))
    assert factory["prompt_tokens_total"].total[()] == 137
    assert factory["generation_tokens_total"].total[()] == 30


def test_engine_reforms(fake):
    factory, ms = fake
    em = EngineMetrics(ms)
    em.observe_reforms([])
    em.observe_reforms([0.5])
    em.observe_reforms([0.5, 2.0])
    assert factory["group_reforms_total"].total[()] == 2
    assert factory["group_reform_seconds"].observed[()] == [0.5, 2.0]


def test_request_latencies(fake):
    factory, ms = fake
    r = RequestMetrics(ms, start=10.0)
    r.on_token(1, now=10.5)  # first token
    r.on_token(1, now=10.6)
    r.on_token(2, now=11.0)  # a chunk of two: the gap spread over both
    r.on_finish("stop")
    r.on_finish("error")  # once only
    assert factory["time_to_first_token_seconds"].observed[()] == [pytest.approx(0.5)]
    assert factory["inter_token_latency_seconds"].observed[()] == pytest.approx([0.1, 0.2, 0.2])
    assert factory["requests_finished_total"].total == {(("reason", "stop"),): 1}
    assert r.tokens == 4


def test_first_chunk_with_several_tokens(fake):
    factory, ms = fake
    r = RequestMetrics(ms, start=0.0)
    r.on_token(3, now=1.0)
    assert factory["time_to_first_token_seconds"].observed[()] == [1.0]
    assert factory["inter_token_latency_seconds"].observed[()] == [0.0, 0.0]


@pytest.mark.parametrize("reason,cause", [("client", "client"), ("deadline", "deadline"), ("error", "error"),
                                          ("abort", "client"), ("timeout", "deadline"), ("weird", "error")])
def test_aborts_by_cause(fake, reason, cause):
    factory, ms = fake
    r = RequestMetrics(ms, clock=lambda: 5.0, start=1.0)
    r.on_first_token()
    r.on_finish(reason)
    assert factory["requests_finished_total"].total == {(("reason", cause),): 1}


def test_expert_counts_and_imbalance(fake):
    factory, ms = fake
    em = ExpertMetrics(ms, transport="deepspeed")
    out = em.observe_token_counts({0: [4, 4, 4, 4], 1: [8, 0, 0, 0]})
    assert out == {0: pytest.approx(1.0), 1: pytest.approx(4.0)}
    out = em.observe_token_counts({0: [4, 4, 4, 10], 1: [8, 0, 0, 0]})  # layer 1 did not move
    assert out == {0: pytest.approx(4.0)}
    tokens = factory["expert_tokens_total"].total
    assert tokens[(("expert", "3"), ("layer", "0"))] == 10
    assert tokens[(("expert", "0"), ("layer", "1"))] == 8
    assert (("expert", "1"), ("layer", "1")) not in tokens  # zero increments are not recorded
    assert factory["expert_imbalance_ratio"].value[(("layer", "0"),)] == pytest.approx(4.0)
    assert factory["expert_imbalance_ratio"].value[(("layer", "1"),)] == pytest.approx(4.0)
    em.observe_exchange(0.002)
    assert factory["expert_exchange_latency_seconds"].observed[(("transport", "deepspeed"),)] == [0.002]
    em.set_shards_health({0: True, 1: False})
    assert factory["shard_up"].value == {(("rank", "0"),): 1.0, (("rank", "1"),): 0.0}


def test_expert_counts_take_tensors_and_can_skip_per_expert_series(fake):
    torch = pytest.importorskip("torch")
    factory, ms = fake
    em = ExpertMetrics(ms, per_expert=False)
    em.observe_token_counts({3: torch.tensor([1, 3])})
    assert "moe_cluster_expert_tokens_total" not in factory.made
    assert factory["expert_imbalance_ratio"].value[(("layer", "3"),)] == pytest.approx(1.5)


def test_grpc_vision_and_autoscaling_recorders(fake):
    factory, ms = fake

    class Code:
        name = "INVALID_ARGUMENT"

    GrpcMetrics(ms).response("Generate", Code())
    GrpcMetrics(ms).response("Generate", "ok")
    assert factory["grpc_responses_total"].total == {(("code", "INVALID_ARGUMENT"), ("method", "Generate")): 1,
                                                     (("code", "OK"), ("method", "Generate")): 1}
    v = VisionMetrics(ms)
    v.observe_preprocess(0.01)
    v.observe_encoder(0.2)
    assert factory["vision_encoder_seconds"].observed[()] == [0.2]
    AutoscalingMetrics(ms).record("app", "EngineServer", 5, 4, {"kv_usage": 0.9, "bad": float("nan")})
    assert factory["autoscaling_wanted_replicas"].value[(("application", "app"), ("deployment", "EngineServer"))] == 5
    assert set(factory["autoscaling_signal"].value) == {(("application", "app"), ("deployment", "EngineServer"),
                                                         ("signal", "kv_usage"))}


def test_ray_factory_builds_real_ray_metric_objects():
    """The real factory makes Ray's classes (serve.metrics unless the series carries Serve's tags)
    with the registry's boundaries; creating them needs no running cluster."""
    from ray.util import metrics as rm

    hist = dm.ray_metric_factory(dm.metric("time_to_first_token_seconds"))
    assert isinstance(hist, rm.Histogram) and hist.boundaries == list(dm.TTFT_BUCKETS)
    gauge = dm.ray_metric_factory(dm.metric("autoscaling_signal"))
    assert type(gauge) is rm.Gauge


def test_engine_metrics_from_a_snapshot(fake):
    """Everything an engine replica exports comes from one published snapshot: the stats, the
    re-form times and the expert token counts."""
    factory, ms = fake
    em = EngineMetrics(ms, transport="ray")
    load = KVLoad(free_blocks=50, reserved_blocks=0, total_blocks=100, block_size=16, num_running=1, num_waiting=0)
    em.observe(EngineSnapshot(stats(num_running=1, kv_blocks_used=50, generation_tokens=9), load, {0: [1, 3]}, (1.0,)))
    em.observe(EngineSnapshot(stats(num_running=1, kv_blocks_used=50, generation_tokens=12), load, {0: [2, 6]},
                              (1.0, 0.5)))
    assert factory["kv_usage_ratio"].value[()] == 0.5
    assert factory["generation_tokens_total"].total[()] == 12
    assert factory["group_reforms_total"].total[()] == 2
    assert factory["group_reform_seconds"].observed[()] == [1.0, 0.5]
    assert factory["expert_tokens_total"].total[(("expert", "1"), ("layer", "0"))] == 6
    assert factory["expert_imbalance_ratio"].value[(("layer", "0"),)] == pytest.approx(1.5)
