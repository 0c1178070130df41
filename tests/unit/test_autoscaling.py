"""The autoscaling policies against Ray Serve's own AutoscalingContext, built the way the Serve
controller builds it: a DeploymentAutoscalingState fed with ReplicaMetricReports that carry what
the replicas' `record_autoscaling_stats()` returned. No Ray cluster is started."""

from __future__ import annotations

import time

import pytest
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState, _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID, ReplicaMetricReport, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.engine.stats import KVLoad
from deployments.telemetry.autoscaling import EngineAutoscalingPolicy, Signal, decide_units
from deployments.telemetry.autoscaling_settings import AutoscalingSettings, ExpertGroupScaling
from deployments.telemetry.signals import (
    EXCHANGE_LATENCY_KEY,
    EXPERT_LOAD_KEY,
    KV_USAGE_KEY,
    RUNNING_KEY,
    WAITING_KEY,
    ExchangeTotals,
    ExpertSignals,
    kv_signals,
)

APP = "moe-cluster"
DEP = "EngineServer"


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


def engine(kv: float, waiting: float = 0.0) -> dict[str, float]:
    """One engine replica's report."""
    return {KV_USAGE_KEY: kv, WAITING_KEY: waiting}


def policy(**kw) -> EngineAutoscalingPolicy:
    return EngineAutoscalingPolicy(record_metrics=False, **kw)


def test_kv_signals_from_the_published_load():
    load = KVLoad(free_blocks=10, reserved_blocks=4, total_blocks=40, block_size=16, num_running=3, num_waiting=5)
    assert kv_signals(load) == {KV_USAGE_KEY: 0.75, WAITING_KEY: 5.0, RUNNING_KEY: 3.0}
    assert all(isinstance(v, float) for v in kv_signals(load).values())  # Serve checks the types


def test_context_carries_replica_reported_stats():
    ctx = context(DEP, [engine(0.9, 3), engine(0.5, 1)])
    assert ctx.current_num_replicas == 2
    assert sorted(ctx.aggregated_metrics[KV_USAGE_KEY].values()) == pytest.approx([0.5, 0.9])


def test_engine_scales_up_on_kv_use_while_queue_is_empty():
    # Few long prompts: KV nearly full, nothing waiting, few ongoing requests.
    num, state = policy(target_kv_usage=0.7)(context(DEP, [engine(0.95), engine(0.9)]))
    assert num == 3  # ceil(2 * 0.925 / 0.7)
    assert state["engine_why"].startswith("up: kv_usage")


def test_engine_scales_up_on_waiting_queue():
    num, _ = policy(target_waiting=2)(context(DEP, [engine(0.1, 6), engine(0.1, 6)]))
    assert num == 6  # ceil(2 * 6 / 2)
    num, _ = policy(target_waiting=2)(context(DEP, [engine(0.1, 2.5)]))
    assert num == 2  # at least one more


def test_engine_holds_in_the_band_and_scales_down_when_both_well_under():
    p = policy(target_kv_usage=0.8, target_waiting=2)
    assert p(context(DEP, [engine(0.6), engine(0.5)]))[0] == 2  # under target, over the low mark
    assert p(context(DEP, [engine(0.1, 3), engine(0.1, 0)]))[0] == 2  # waiting 1.5 > low 1
    num, state = p(context(DEP, [engine(0.1), engine(0.2), engine(0.0)]))
    assert num == 2 and state["engine_why"].startswith("down")  # one step at a time
    p2 = policy(target_kv_usage=0.8, target_waiting=2, max_step_down=4)
    assert p2(context(DEP, [engine(0.1)] * 4))[0] == 1  # ceil(4 * 0.1 / 0.8) = 1


def test_engine_bounds_come_from_config():
    p = policy(target_kv_usage=0.5)
    assert p(context(DEP, [engine(1.0)] * 3, max_replicas=4))[0] == 4
    assert policy(target_kv_usage=0.5, max_replicas=3)(context(DEP, [engine(1.0)] * 3, max_replicas=8))[0] == 3
    assert p(context(DEP, [engine(0.0)] * 2, min_replicas=2))[0] == 2
    assert policy(min_replicas=2)(context(DEP, [engine(0.0)], min_replicas=1))[0] == 2


def test_engine_never_scales_down_while_overloaded_during_a_scale_up():
    # One replica running, three already on their way (target 4): still over target -> keep 4.
    num, _ = policy(target_kv_usage=0.7)(context(DEP, [engine(0.8)], target=4))
    assert num == 4


def test_engine_holds_without_reports():
    ctx = context(DEP, [], running=2, target=2)
    assert policy()(ctx)[0] == 2


def test_engine_policy_validates_its_targets():
    with pytest.raises(ValueError):
        EngineAutoscalingPolicy(target_kv_usage=1.5)
    with pytest.raises(ValueError):
        EngineAutoscalingPolicy(target_kv_usage=0.5, kv_usage_low=0.6)


def test_engine_policy_through_serve_instantiation_and_wrapper():
    """The way Serve runs it: the class from `policy_function` instantiated with `policy_kwargs`,
    wrapped with the delay logic, then bounded by the deployment's min/max."""
    settings = AutoscalingSettings(engine={"max_replicas": 3, "target_kv_usage": 0.6, "upscale_delay_s": 0,
                                           "downscale_delay_s": 0}, record_metrics=False)
    cfg = AutoscalingConfig(**settings.engine_config())
    assert cfg.policy.policy_function == "deployments.telemetry.autoscaling:EngineAutoscalingPolicy"
    assert cfg.policy.policy_kwargs["target_kv_usage"] == 0.6
    run = _apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
    config = settings.engine_config()
    up, state = run(context(DEP, [engine(0.9)], config=config, max_replicas=3))
    assert up == 2
    down, _ = run(context(DEP, [engine(0.0), engine(0.0)], config=config, max_replicas=3, policy_state=state))
    assert down == 1
    # With an upscale delay the first over-target tick holds.
    delayed = _apply_autoscaling_config(_resolve_policy_callable(AutoscalingConfig(
        **AutoscalingSettings(record_metrics=False).engine_config()).policy))
    assert delayed(context(DEP, [engine(0.99)], config=AutoscalingSettings().engine_config()))[0] == 1


def test_decide_units_rules():
    up = Signal("x", 0.9, 0.5, 0.2)
    low = Signal("y", 0.1, 0.5, 0.2)
    assert decide_units([up, low], current=2, target=2, lower=1, upper=10) == (4, 4, "up: x 0.9 > 0.5")
    assert decide_units([low], current=3, target=3, lower=1, upper=10)[0] == 2
    assert decide_units([low], current=3, target=3, lower=3, upper=10)[0] == 3
    assert decide_units([up], current=2, target=2, lower=1, upper=3)[:2] == (3, 4)  # the wish is kept


def test_expert_signals_since_the_previous_report():
    m = ExpertSignals(num_shards=2)
    assert m.update(100, ExchangeTotals(3, 0.3), now=10.0) == {}  # a rate needs two readings
    second = m.update(500, ExchangeTotals(5, 0.36), now=12.0)
    assert second[EXPERT_LOAD_KEY] == pytest.approx(100.0)  # 400 / 2 s / 2 shards
    assert second[EXCHANGE_LATENCY_KEY] == pytest.approx(0.03)  # 0.06 s over 2 exchanges
    assert m.update(500, ExchangeTotals(5, 0.36), now=14.0) == {EXPERT_LOAD_KEY: 0.0, EXCHANGE_LATENCY_KEY: 0.0}
    assert m.update(20, ExchangeTotals(1, 0.01), now=16.0)[EXPERT_LOAD_KEY] == 0.0  # a new engine: no negative rate


def group(kv: float, load: float | None = None, latency: float | None = None) -> dict[str, float]:
    """An engine replica that is a whole expert group: its KV use plus the expert signals."""
    out = engine(kv)
    if load is not None:
        out[EXPERT_LOAD_KEY] = load
    if latency is not None:
        out[EXCHANGE_LATENCY_KEY] = latency
    return out


def test_group_policy_scales_on_expert_load_with_kv_fine():
    p = policy(target_kv_usage=0.7, target_expert_load=1000)
    num, state = p(context(DEP, [group(0.3, load=1800)] * 2))
    assert num == 4 and state["engine_why"] == "up: expert_load 1.8e+03 > 1000"  # ceil(2 * 1.8)
    assert p(context(DEP, [group(0.3, load=700)] * 2))[0] == 2  # in the band (low mark 500)
    assert p(context(DEP, [group(0.1, load=100)] * 3))[0] == 2  # every signal well under: one less
    # KV over target with the experts idle: the groups still follow the engines' need.
    assert p(context(DEP, [group(0.95, load=10)] * 2))[0] == 3


def test_group_policy_on_exchange_latency_and_its_ceiling():
    p = policy(target_exchange_latency_s=0.01, expert_low_ratio=0.2)
    assert p(context(DEP, [group(0.1, latency=0.05)] * 2, max_replicas=3))[0] == 3
    assert p(context(DEP, [group(0.1, latency=0.003)] * 2))[0] == 2  # over 0.2 x target: hold
    assert p(context(DEP, [group(0.1, latency=0.001)] * 2))[0] == 1
    # Not targeted: the signal is reported but ignored.
    assert policy()(context(DEP, [group(0.1, latency=9.0)] * 2))[0] == 1


def test_group_policy_validates_expert_targets():
    with pytest.raises(ValueError, match="target_exchange_latency_s"):
        EngineAutoscalingPolicy(target_exchange_latency_s=0)
    with pytest.raises(ValueError, match="expert_low_ratio"):
        EngineAutoscalingPolicy(target_expert_load=10, expert_low_ratio=1.0)
    with pytest.raises(ValueError, match="target_expert_load, target_exchange_latency_s or both"):
        ExpertGroupScaling(target_exchange_latency_s=None)
    with pytest.raises(ValueError, match="min_groups"):
        ExpertGroupScaling(min_groups=3, max_groups=2)


def test_group_settings_through_serve_instantiation_and_wrapper():
    settings = AutoscalingSettings(experts={"min_groups": 1, "max_groups": 3, "target_expert_load": 1000,
                                            "target_exchange_latency_s": None, "upscale_delay_s": 0,
                                            "downscale_delay_s": 0}, record_metrics=False)
    config = settings.engine_config()
    cfg = AutoscalingConfig(**config)
    assert (cfg.min_replicas, cfg.max_replicas) == (1, 3)  # the engine bounds are the groups'
    assert cfg.policy.policy_kwargs["target_expert_load"] == 1000
    assert "target_exchange_latency_s" not in cfg.policy.policy_kwargs
    run = _apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
    up, state = run(context(DEP, [group(0.2, load=2500)], config=config, max_replicas=3))
    assert up == 3
    down, _ = run(context(DEP, [group(0.0, load=0.0)] * 3, config=config, max_replicas=3, policy_state=state))
    assert down == 2


def test_settings_render_valid_serve_configs():
    s = AutoscalingSettings(experts=ExpertGroupScaling(max_groups=2))
    AutoscalingConfig(**s.ingress_config())
    rc = AutoscalingConfig(**s.engine_config())
    assert rc.policy.policy_function.endswith(":EngineAutoscalingPolicy") and rc.max_replicas == 2
    assert rc.policy.policy_kwargs["target_exchange_latency_s"] == 0.05
    assert s.engine_bounds() == (1, 2) and AutoscalingSettings().engine_bounds() == (1, 4)
    alone = AutoscalingConfig(**AutoscalingSettings().engine_config())
    assert alone.policy.policy_function.endswith(":EngineAutoscalingPolicy")
    assert "target_expert_load" not in alone.policy.policy_kwargs
    assert AutoscalingSettings().ingress_config()["target_ongoing_requests"] == 32


def test_the_old_router_key_still_configures_the_engines(caplog, monkeypatch):
    """`autoscaling.router` was renamed `engine`: old configs keep working, with one warning."""
    import logging

    from deployments import renamed_keys

    monkeypatch.setattr(renamed_keys, "_warned", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="deployments.renamed_keys"):
        old = AutoscalingSettings.model_validate({"router": {"max_replicas": 3}})
        again = AutoscalingSettings.model_validate({"router": {"max_replicas": 3}})
    assert old.engine.max_replicas == 3 and again == old
    warnings = [r.getMessage() for r in caplog.records if "autoscaling.router" in r.getMessage()]
    assert len(warnings) == 1 and "autoscaling.engine" in warnings[0]
    with pytest.raises(ValueError, match="give only autoscaling.engine"):
        AutoscalingSettings.model_validate({"router": {}, "engine": {}})
