"""The autoscaling policies against Ray Serve's own AutoscalingContext, built the way the Serve
controller builds it: a DeploymentAutoscalingState fed with ReplicaMetricReports that carry what
the replicas' `record_autoscaling_stats()` returned. No Ray cluster is started."""

from __future__ import annotations

import time

import pytest
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState, _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID, ReplicaMetricReport, TimeStampedValue
from ray.serve._private.gang_scheduling_autoscaling_policy import GangSchedulingAutoscalingPolicy
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config, _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from cluster.stats import EngineStats
from deployments.autoscaling import (
    EXCHANGE_LATENCY_KEY,
    EXPERT_LOAD_KEY,
    KV_USAGE_KEY,
    WAITING_KEY,
    AutoscalingSettings,
    ExpertGroupAutoscalingPolicy,
    ExpertGroupScaling,
    ExpertLoadMeter,
    ExpertShardAutoscalingPolicy,
    RouterAutoscalingPolicy,
    Signal,
    decide_units,
    router_autoscaling_stats,
)

APP = "moe-cluster"


def context(deployment: str, per_replica: list[dict[str, float]], *, running: int | None = None,
            target: int | None = None, min_replicas: int = 1, max_replicas: int = 8, config: dict | None = None,
            policy_state: dict | None = None) -> AutoscalingContext:
    """A real AutoscalingContext from the controller's DeploymentAutoscalingState: each dict is
    one replica's `record_autoscaling_stats()` result, reported twice over the look-back window."""
    dep = DeploymentID(name=deployment, app_name=APP)
    state = DeploymentAutoscalingState(dep)
    state._config = AutoscalingConfig(**{"min_replicas": min_replicas, "max_replicas": max_replicas, **(config or {})})
    n = len(per_replica) if running is None else running
    replicas = [ReplicaID(unique_id=f"{deployment}-{i}", deployment_id=dep) for i in range(n)]
    state.update_running_replica_ids(replicas)
    now = time.time()
    for replica, stats in zip(replicas, per_replica, strict=False):
        state.record_request_metrics_for_replica(ReplicaMetricReport(
            replica_id=replica, timestamp=now,
            metrics={k: [TimeStampedValue(now - 1.0, v), TimeStampedValue(now - 0.5, v)] for k, v in stats.items()}))
    ctx = state.get_autoscaling_context(n if target is None else target, policy_state)
    return ctx


def router(kv: float, waiting: float = 0.0) -> dict[str, float]:
    return {KV_USAGE_KEY: kv, WAITING_KEY: waiting}


def policy(**kw) -> RouterAutoscalingPolicy:
    return RouterAutoscalingPolicy(record_metrics=False, **kw)


def test_router_stats_from_engine_snapshot():
    s = EngineStats(num_running=3, num_waiting=5, kv_blocks_used=30, kv_blocks_total=40, num_preemptions=0,
                    forward_calls=0, prompt_tokens=0, generation_tokens=0, aborts=0)
    assert router_autoscaling_stats(s) == {KV_USAGE_KEY: 0.75, WAITING_KEY: 5.0, "num_running": 3.0}
    assert all(isinstance(v, float) for v in router_autoscaling_stats(s).values())  # Serve checks the types


def test_context_carries_replica_reported_stats():
    ctx = context("Router", [router(0.9, 3), router(0.5, 1)])
    assert ctx.current_num_replicas == 2
    assert sorted(ctx.aggregated_metrics[KV_USAGE_KEY].values()) == pytest.approx([0.5, 0.9])


def test_router_scales_up_on_kv_use_while_queue_is_empty():
    # Few long prompts: KV nearly full, nothing waiting, few ongoing requests.
    num, state = policy(target_kv_usage=0.7)(context("Router", [router(0.95), router(0.9)]))
    assert num == 3  # ceil(2 * 0.925 / 0.7)
    assert state["router_why"].startswith("up: kv_usage")


def test_router_scales_up_on_waiting_queue():
    num, _ = policy(target_waiting=2)(context("Router", [router(0.1, 6), router(0.1, 6)]))
    assert num == 6  # ceil(2 * 6 / 2)
    num, _ = policy(target_waiting=2)(context("Router", [router(0.1, 2.5)]))
    assert num == 2  # at least one more


def test_router_holds_in_the_band_and_scales_down_when_both_well_under():
    p = policy(target_kv_usage=0.8, target_waiting=2)
    assert p(context("Router", [router(0.6), router(0.5)]))[0] == 2  # under target, over the low mark
    assert p(context("Router", [router(0.1, 3), router(0.1, 0)]))[0] == 2  # waiting 1.5 > low 1
    num, state = p(context("Router", [router(0.1), router(0.2), router(0.0)]))
    assert num == 2 and state["router_why"].startswith("down")  # one step at a time
    p2 = policy(target_kv_usage=0.8, target_waiting=2, max_step_down=4)
    assert p2(context("Router", [router(0.1)] * 4))[0] == 1  # ceil(4 * 0.1 / 0.8) = 1


def test_router_bounds_come_from_config():
    p = policy(target_kv_usage=0.5)
    assert p(context("Router", [router(1.0)] * 3, max_replicas=4))[0] == 4
    assert policy(target_kv_usage=0.5, max_replicas=3)(context("Router", [router(1.0)] * 3, max_replicas=8))[0] == 3
    assert p(context("Router", [router(0.0)] * 2, min_replicas=2))[0] == 2
    assert policy(min_replicas=2)(context("Router", [router(0.0)], min_replicas=1))[0] == 2


def test_router_never_scales_down_while_overloaded_during_a_scale_up():
    # One replica running, three already on their way (target 4): still over target -> keep 4.
    num, _ = policy(target_kv_usage=0.7)(context("Router", [router(0.8)], target=4))
    assert num == 4


def test_router_holds_without_reports():
    ctx = context("Router", [], running=2, target=2)
    assert policy()(ctx)[0] == 2


def test_router_policy_validates_its_targets():
    with pytest.raises(ValueError):
        RouterAutoscalingPolicy(target_kv_usage=1.5)
    with pytest.raises(ValueError):
        RouterAutoscalingPolicy(target_kv_usage=0.5, kv_usage_low=0.6)


def test_router_policy_through_serve_instantiation_and_wrapper():
    """The way Serve runs it: the class from `policy_function` instantiated with `policy_kwargs`,
    wrapped with the delay logic, then bounded by the deployment's min/max."""
    settings = AutoscalingSettings(router={"max_replicas": 3, "target_kv_usage": 0.6, "upscale_delay_s": 0,
                                           "downscale_delay_s": 0}, record_metrics=False)
    cfg = AutoscalingConfig(**settings.router_config())
    assert cfg.policy.policy_function == "deployments.autoscaling:RouterAutoscalingPolicy"
    assert cfg.policy.policy_kwargs["target_kv_usage"] == 0.6
    run = _apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
    config = settings.router_config()
    up, state = run(context("Router", [router(0.9)], config=config, max_replicas=3))
    assert up == 2
    down, _ = run(context("Router", [router(0.0), router(0.0)], config=config, max_replicas=3, policy_state=state))
    assert down == 1
    # With an upscale delay the first over-target tick holds.
    delayed = _apply_autoscaling_config(_resolve_policy_callable(AutoscalingConfig(
        **AutoscalingSettings(record_metrics=False).router_config()).policy))
    assert delayed(context("Router", [router(0.99)], config=AutoscalingSettings().router_config()))[0] == 1


def test_decide_units_rules():
    up = Signal("x", 0.9, 0.5, 0.2)
    low = Signal("y", 0.1, 0.5, 0.2)
    assert decide_units([up, low], current=2, target=2, lower=1, upper=10) == (4, 4, "up: x 0.9 > 0.5")
    assert decide_units([low], current=3, target=3, lower=1, upper=10)[0] == 2
    assert decide_units([low], current=3, target=3, lower=3, upper=10)[0] == 3
    assert decide_units([up], current=2, target=2, lower=1, upper=3)[:2] == (3, 4)  # the wish is kept


def test_expert_load_meter():
    m = ExpertLoadMeter(num_shards=2)
    assert m.update(100, 10.0) == 0.0
    assert m.update(500, 12.0) == pytest.approx(100.0)  # 400 / 2 s / 2 shards


def shard(load: float) -> dict[str, float]:
    return {EXPERT_LOAD_KEY: load}


def test_shard_policy_scales_whole_gangs():
    p = ExpertShardAutoscalingPolicy(shards_per_group=2, target_expert_load=1000, record_metrics=False)
    num, state = p(context("ExpertShard", [shard(1800)] * 4, max_replicas=8))
    assert num == 4 * 2 and num % 2 == 0  # ceil(2 groups * 1.8) = 4 groups
    assert p(context("ExpertShard", [shard(100)] * 4, max_replicas=8))[0] == 2
    assert p(context("ExpertShard", [shard(700)] * 4, max_replicas=8))[0] == 4  # in the band
    assert p(context("ExpertShard", [shard(5000)] * 4, max_replicas=7))[0] == 6  # 7 // 2 groups at most
    # Serve's own gang wrapper keeps it whole too.
    gang = GangSchedulingAutoscalingPolicy(p, 2)
    assert gang(context("ExpertShard", [shard(1800)] * 4, max_replicas=8))[0] % 2 == 0
    with pytest.raises(ValueError):
        ExpertShardAutoscalingPolicy(shards_per_group=2)


def test_shard_policy_on_exchange_latency():
    p = ExpertShardAutoscalingPolicy(shards_per_group=3, target_exchange_latency_s=0.01, record_metrics=False)
    assert p(context("ExpertShard", [{EXCHANGE_LATENCY_KEY: 0.05}] * 3, max_replicas=9))[0] == 9
    assert p(context("ExpertShard", [{EXCHANGE_LATENCY_KEY: 0.001}] * 6, max_replicas=9))[0] == 3


def group_contexts(routers, shards, *, n=2, max_groups=4, ingress_requests=None, config=None):
    cfg = config or {}
    ctxs = {
        "Router": context("Router", routers, max_replicas=max_groups, config=cfg),
        "ExpertShard": context("ExpertShard", shards, min_replicas=n, max_replicas=max_groups * n, config=cfg),
    }
    if ingress_requests is not None:
        ctxs["Ingress"] = context("Ingress", [{}], max_replicas=4, config={"target_ongoing_requests": 2})
        ctxs["Ingress"]._total_num_requests_value = ingress_requests
    return {c.deployment_id: c for c in ctxs.values()}


def by_name(decisions):
    return {dep.name: n for dep, n in decisions.items()}


def test_group_policy_moves_routers_and_shards_together():
    p = ExpertGroupAutoscalingPolicy(shards_per_group=2, target_expert_load=1000, target_kv_usage=0.7,
                                     record_metrics=False)
    # Expert load over target, KV fine: one more group.
    d, states = p(group_contexts([router(0.3)], [shard(1500)] * 2))
    assert by_name(d) == {"Router": 2, "ExpertShard": 4}
    # KV over target, experts idle: groups follow the routers' need.
    d, _ = p(group_contexts([router(0.95), router(0.95)], [shard(10)] * 4))
    assert by_name(d) == {"Router": 3, "ExpertShard": 6}
    # Everything well under: one group less.
    d, _ = p(group_contexts([router(0.1), router(0.1)], [shard(10)] * 4))
    assert by_name(d) == {"Router": 1, "ExpertShard": 2}
    # The ceiling: max_groups.
    d, _ = p(group_contexts([router(1.0)] * 4, [shard(9000)] * 8))
    assert by_name(d) == {"Router": 4, "ExpertShard": 8}
    assert all("why" in s for s in states.values())


def test_group_policy_counts_complete_groups_and_leaves_ingress_to_default():
    p = ExpertGroupAutoscalingPolicy(shards_per_group=2, target_exchange_latency_s=0.01, record_metrics=False)
    # Two routers but only one complete group of shards running: current = 1 group.
    d, _ = p(group_contexts([router(0.3, 0) | {EXCHANGE_LATENCY_KEY: 0.02}] * 2, [shard(0)] * 3,
                            ingress_requests=8.0))
    names = by_name(d)
    assert names["Router"] == 2 and names["ExpertShard"] == 4
    assert names["Ingress"] == pytest.approx(4.0)  # Serve's default: 8 ongoing / target 2


def test_group_policy_through_serve_app_level_wrapper():
    settings = AutoscalingSettings(experts={"shards_per_group": 2, "min_groups": 1, "max_groups": 3,
                                            "target_expert_load": 1000, "upscale_delay_s": 0,
                                            "downscale_delay_s": 0}, record_metrics=False)
    app_policy = AutoscalingPolicy(**settings.application_policy())
    run = _apply_app_level_autoscaling_config(_resolve_policy_callable(app_policy))
    shard_cfg, router_cfg = settings.shard_config(), settings.router_config()
    assert (shard_cfg["min_replicas"], shard_cfg["max_replicas"]) == (2, 6)
    assert (router_cfg["min_replicas"], router_cfg["max_replicas"]) == (1, 3)
    ctxs = {
        c.deployment_id: c for c in (
            context("Router", [router(0.2)], max_replicas=3, config=router_cfg),
            context("ExpertShard", [shard(2500)] * 2, min_replicas=2, max_replicas=6, config=shard_cfg))}
    decisions, _ = run(ctxs)
    assert by_name(decisions) == {"Router": 3, "ExpertShard": 6}


def test_settings_render_valid_serve_configs():
    s = AutoscalingSettings(experts=ExpertGroupScaling(shards_per_group=4, max_groups=2))
    AutoscalingConfig(**s.ingress_config())
    AutoscalingConfig(**s.shard_config())
    rc = AutoscalingConfig(**s.router_config())
    assert rc.policy.is_default_policy_function()  # the application-level policy decides instead
    assert AutoscalingPolicy(**s.application_policy()).policy_kwargs["shards_per_group"] == 4
    alone = AutoscalingConfig(**AutoscalingSettings().router_config())
    assert alone.policy.policy_function.endswith(":RouterAutoscalingPolicy")
    assert AutoscalingSettings().ingress_config()["target_ongoing_requests"] == 32
    with pytest.raises(ValueError):
        AutoscalingSettings().application_policy()
