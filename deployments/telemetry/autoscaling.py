"""Autoscaling on what the cluster measures.

- Ingress: Serve's default policy on ongoing requests (`target_ongoing_requests`).
- Routers: `RouterAutoscalingPolicy`, a deployment-level Ray Serve policy fed by the replicas' own
  stats (`Router.record_autoscaling_stats()` returns `router_autoscaling_stats(engine.stats())`):
  scale up when the mean KV use or the mean waiting queue is over its target, down when both are
  well under, hold in between.
- Expert groups: under the `deepspeed` transport a router replica brings its own group of expert
  shards that steps in lockstep with it (under `local` the experts live in the router), so a router
  replica *is* a whole expert group and scaling routers scales groups as units. With
  `autoscaling.experts` set, `RouterAutoscalingPolicy` also weighs the expert load per shard and
  the mean exchange latency that each replica reports, and the router bounds become
  `min_groups` / `max_groups`. Under the `ray` transport every router shares one fixed set of
  shards (`num_expert_shards`), so there is no group to add: `autoscaling.experts` is refused.

Every bound and target is configuration: `AutoscalingSettings` (pydantic, at the edge) renders
the `autoscaling_config` dicts and the application-level `autoscaling_policy` dict that Serve
takes, with the targets as `policy_kwargs`. Serve instantiates a class policy once with those
kwargs and then calls it with an `AutoscalingContext` every control-loop tick; around it Serve
applies `upscale_delay_s` / `downscale_delay_s`, the scaling factors and min/max replicas.

This module runs in the Serve controller (Serve pickles it by value): it must not import torch or
the `cluster` package at module level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

if TYPE_CHECKING:
    from cluster.engine.stats import EngineStats, KVLoad

logger = logging.getLogger("ray.serve")

# Keys of the stats that replicas report through `record_autoscaling_stats()`.
KV_USAGE_KEY = "kv_usage"  # router: KV blocks used / total, 0..1
WAITING_KEY = "num_waiting"  # router: sequences waiting for admission
RUNNING_KEY = "num_running"  # router: sequences in the running batch
EXPERT_LOAD_KEY = "expert_load"  # shard (or router): routed (token, expert) assignments per second per shard
EXCHANGE_LATENCY_KEY = "exchange_latency_s"  # router: mean seconds of one MoE layer's exchange

POLICY_MODULE = __name__


def router_autoscaling_stats(stats: EngineStats | KVLoad) -> dict[str, float]:
    """What `Router.record_autoscaling_stats()` returns: KV blocks used / total, waiting and running
    sequences, from the engine's snapshot (`EngineStats`) or from the KV load the engine loop
    publishes after every change (`KVLoad`, read without waiting for a step)."""
    if hasattr(stats, "kv_usage"):
        kv_usage = float(stats.kv_usage)
    else:
        total = stats.total_blocks
        kv_usage = (total - stats.free_blocks) / total if total else 0.0
    return {KV_USAGE_KEY: kv_usage, WAITING_KEY: float(stats.num_waiting), RUNNING_KEY: float(stats.num_running)}


class ExpertLoadMeter:
    """Turns cumulative routed-token counts into the `expert_load` rate a shard (or router) reports:
    `meter.update(total_assignments, now)` -> assignments per second per shard since the last call."""

    def __init__(self, num_shards: int = 1) -> None:
        self.num_shards = max(1, num_shards)
        self._last: tuple[float, float] | None = None
        self.rate = 0.0

    def update(self, total: float, now: float) -> float:
        if self._last is not None and now > self._last[1] and total >= self._last[0]:
            self.rate = (total - self._last[0]) / (now - self._last[1]) / self.num_shards
        self._last = (total, now)
        return self.rate


# ---------------------------------------------------------------------------------------------
# The decision rules (pure functions of the signals)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signal:
    """One scaling signal: the mean over reporting replicas, its target, and its low watermark
    (scale down only when every signal is at or under its low watermark)."""

    name: str
    value: float
    target: float
    low: float

    @property
    def over(self) -> bool:
        return self.value > self.target

    @property
    def well_under(self) -> bool:
        return self.value <= self.low

    def units_for(self, units: int) -> float:
        """Units needed to bring the mean to the target, assuming the load spreads evenly."""
        return units * self.value / self.target if self.target > 0 else float(units)


def decide_units(signals: list[Signal], current: int, target: int, lower: int, upper: int,
                 max_step_down: int = 1) -> tuple[int, int, str]:
    """(bounded decision, unbounded wish, why) in scaling units (replicas, or whole groups).

    `current`: units running; `target`: units Serve is heading to (running + starting).
    Up: to the units that bring every over-target signal to its target, at least one more than
    running, never below the target already set. Down (every signal well under): to the units the
    signals need, at most `max_step_down` fewer, never above the target. Else: hold at target.
    Without signals (no replica reported yet) it holds."""
    if current <= 0 or not signals:
        wish = target
        why = "hold: no replica reported yet" if current > 0 else "hold: no running replica"
    elif any(s.over for s in signals):
        need = max(math.ceil(s.units_for(current) - 1e-9) for s in signals if s.over)
        wish = max(need, current + 1, target)
        why = "up: " + ", ".join(f"{s.name} {s.value:.3g} > {s.target:g}" for s in signals if s.over)
    elif all(s.well_under for s in signals):
        need = max([math.ceil(s.units_for(current) - 1e-9) for s in signals] + [1])
        wish = min(max(need, current - max(1, max_step_down)), target)
        why = "down: " + ", ".join(f"{s.name} {s.value:.3g} <= {s.low:g}" for s in signals)
    else:
        wish = target
        why = "hold: within the band"
    return max(lower, min(upper, wish)), wish, why


def _mean(per_replica: Mapping[Any, float] | None) -> float | None:
    values = [float(v) for v in (per_replica or {}).values() if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def _metrics(ctx: Any) -> dict[str, dict[Any, float]]:
    try:
        return dict(ctx.aggregated_metrics or {})
    except Exception:  # a stats callback that failed on the controller side
        logger.exception("autoscaling: reading the replicas' stats failed")
        return {}


def _bounds(ctx: Any, min_units: int | None, max_units: int | None, per_unit: int = 1) -> tuple[int, int]:
    """Bounds in units: the tighter of the deployment's (capacity-adjusted) min/max replicas and
    the policy's own."""
    lower = math.ceil(ctx.capacity_adjusted_min_replicas / per_unit)
    upper = ctx.capacity_adjusted_max_replicas // per_unit
    if min_units is not None:
        lower = max(lower, min_units)
    if max_units is not None:
        upper = min(upper, max_units)
    return lower, max(lower, upper)


def expert_signals(metric_sources: Any, target_expert_load: float | None,
                   target_exchange_latency_s: float | None, low_ratio: float) -> list[Signal]:
    """Expert load and exchange latency, each averaged over every replica that reports it."""
    out = []
    for key, target in ((EXPERT_LOAD_KEY, target_expert_load), (EXCHANGE_LATENCY_KEY, target_exchange_latency_s)):
        if target is None:
            continue
        values: dict[Any, float] = {}
        for source in metric_sources:
            values.update(source.get(key) or {})
        mean = _mean(values)
        if mean is not None:
            out.append(Signal(key, mean, target, target * low_ratio))
    return out


class _Recorder:
    """Exports decisions as `ray_moe_cluster_autoscaling_*` (best effort: a policy never fails on
    metrics)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._metrics: Any = None

    def __call__(self, ctx: Any, wanted: float, upper: float, signals: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            if self._metrics is None:
                from deployments.telemetry.metrics import AutoscalingMetrics, MetricSet

                self._metrics = AutoscalingMetrics(MetricSet())
            self._metrics.record(ctx.app_name or "", ctx.deployment_name, wanted, upper, signals)
        except Exception:
            logger.warning("autoscaling: recording metrics failed; not recording any more", exc_info=True)
            self.enabled = False


# ---------------------------------------------------------------------------------------------
# Policies (Serve instantiates them with policy_kwargs)
# ---------------------------------------------------------------------------------------------

class RouterAutoscalingPolicy:
    """Deployment-level policy for routers on replica-reported KV use and waiting queue, and (for
    routers that are whole expert groups) expert load per shard and exchange latency.

    policy_kwargs: target_kv_usage (mean KV used/total to scale up above), target_waiting (mean
    waiting sequences per replica to scale up above), kv_usage_low / waiting_low (scale down only
    when every signal is at or under its low mark; default half the targets), target_expert_load
    (routed assignments per second per shard) and target_exchange_latency_s (mean seconds of one
    MoE layer's exchange), each optional, with low marks at `expert_low_ratio` of the target;
    min_replicas / max_replicas (optional, tighter than the deployment's), max_step_down (replicas
    removed per decision), record_metrics.
    """

    def __init__(self, target_kv_usage: float = 0.75, target_waiting: float = 2.0,
                 kv_usage_low: float | None = None, waiting_low: float | None = None,
                 min_replicas: int | None = None, max_replicas: int | None = None,
                 max_step_down: int = 1, record_metrics: bool = True,
                 target_expert_load: float | None = None, target_exchange_latency_s: float | None = None,
                 expert_low_ratio: float = 0.5) -> None:
        if not 0 < target_kv_usage <= 1:
            raise ValueError(f"target_kv_usage must be in (0, 1], got {target_kv_usage}")
        if target_waiting <= 0:
            raise ValueError(f"target_waiting must be > 0, got {target_waiting}")
        self.target_kv_usage = target_kv_usage
        self.target_waiting = target_waiting
        self.kv_usage_low = target_kv_usage / 2 if kv_usage_low is None else kv_usage_low
        self.waiting_low = target_waiting / 2 if waiting_low is None else waiting_low
        if not (self.kv_usage_low < target_kv_usage and self.waiting_low < target_waiting):
            raise ValueError("the low watermarks must be under the targets")
        for name, target in (("target_expert_load", target_expert_load),
                             ("target_exchange_latency_s", target_exchange_latency_s)):
            if target is not None and target <= 0:
                raise ValueError(f"{name} must be > 0, got {target}")
        if not 0 < expert_low_ratio < 1:
            raise ValueError(f"expert_low_ratio must be in (0, 1), got {expert_low_ratio}")
        self.target_expert_load = target_expert_load
        self.target_exchange_latency_s = target_exchange_latency_s
        self.expert_low_ratio = expert_low_ratio
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.max_step_down = max_step_down
        self._record = _Recorder(record_metrics)

    def signals(self, ctx: Any) -> list[Signal]:
        metrics = _metrics(ctx)
        kv, waiting = _mean(metrics.get(KV_USAGE_KEY)), _mean(metrics.get(WAITING_KEY))
        out = []
        if kv is not None:
            out.append(Signal(KV_USAGE_KEY, kv, self.target_kv_usage, self.kv_usage_low))
        if waiting is not None:
            out.append(Signal(WAITING_KEY, waiting, self.target_waiting, self.waiting_low))
        return out + expert_signals((metrics,), self.target_expert_load, self.target_exchange_latency_s,
                                    self.expert_low_ratio)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        signals = self.signals(ctx)
        lower, upper = _bounds(ctx, self.min_replicas, self.max_replicas)
        decision, wish, why = decide_units(signals, ctx.current_num_replicas, ctx.target_num_replicas,
                                           lower, upper, self.max_step_down)
        self._record(ctx, wish, upper, {s.name: s.value for s in signals})
        state = dict(ctx.policy_state or {})
        state.update(router_decision=decision, router_why=why)
        return decision, state


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

class _Delays(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    upscale_delay_s: NonNegativeFloat = 10.0
    downscale_delay_s: NonNegativeFloat = 120.0
    look_back_period_s: PositiveFloat = 15.0
    metrics_interval_s: PositiveFloat | None = Field(
        None, description="how often replicas and handles report their stats to the controller (Serve's "
                          "`metrics_interval_s`, 10 s when unset; Serve 2.60 marks it deprecated but reads no "
                          "other setting); below look_back_period_s")

    @model_validator(mode="after")
    def _intervals(self) -> _Delays:
        if self.metrics_interval_s is not None and self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(f"metrics_interval_s ({self.metrics_interval_s}) must be under look_back_period_s "
                             f"({self.look_back_period_s})")
        return self


class _Replicas(_Delays):
    min_replicas: PositiveInt = 1
    max_replicas: PositiveInt = 4

    @model_validator(mode="after")
    def _bounds(self) -> _Replicas:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class IngressScaling(_Replicas):
    target_ongoing_requests: PositiveFloat = 32.0


class RouterScaling(_Replicas):
    target_kv_usage: float = Field(0.75, gt=0, le=1)
    target_waiting: PositiveFloat = 2.0
    kv_usage_low: float | None = Field(None, ge=0, le=1)
    waiting_low: NonNegativeFloat | None = None
    max_step_down: PositiveInt = 1


class ExpertGroupScaling(_Delays):
    """Router replicas that are whole expert groups (local and deepspeed transports): their bounds
    in groups and the expert targets that the router policy weighs beside `router`'s."""

    min_groups: PositiveInt = 1
    max_groups: PositiveInt = 4
    target_expert_load: PositiveFloat | None = Field(None, description="routed assignments per second per shard")
    target_exchange_latency_s: PositiveFloat | None = Field(
        0.05, description="mean seconds of one MoE layer's exchange (dispatch + expert compute + combine)")
    low_ratio: float = Field(0.5, gt=0, lt=1, description="scale down only under this fraction of each target")

    @model_validator(mode="after")
    def _bounds(self) -> ExpertGroupScaling:
        if self.min_groups > self.max_groups:
            raise ValueError(f"min_groups ({self.min_groups}) is above max_groups ({self.max_groups})")
        if self.target_expert_load is None and self.target_exchange_latency_s is None:
            raise ValueError("set target_expert_load, target_exchange_latency_s or both")
        return self


class AutoscalingSettings(BaseModel):
    """All bounds and targets of the cluster's autoscaling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingress: IngressScaling = IngressScaling()
    router: RouterScaling = RouterScaling()
    experts: ExpertGroupScaling | None = None
    record_metrics: bool = True

    def ingress_config(self) -> dict[str, Any]:
        s = self.ingress
        return {**_common(s), "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                "target_ongoing_requests": s.target_ongoing_requests}

    def router_config(self) -> dict[str, Any]:
        """The router deployment's autoscaling_config: RouterAutoscalingPolicy on the router targets,
        plus the expert targets with the bounds and delays in groups when `experts` is set."""
        s, e = self.router, self.experts
        kwargs: dict[str, Any] = {
            "target_kv_usage": s.target_kv_usage, "target_waiting": s.target_waiting, "kv_usage_low": s.kv_usage_low,
            "waiting_low": s.waiting_low, "max_step_down": s.max_step_down, "record_metrics": self.record_metrics}
        if e is None:
            bounds: dict[str, Any] = {**_common(s), "min_replicas": s.min_replicas, "max_replicas": s.max_replicas}
        else:
            bounds = {**_common(e), "min_replicas": e.min_groups, "max_replicas": e.max_groups}
            kwargs.update(target_expert_load=e.target_expert_load, expert_low_ratio=e.low_ratio,
                          target_exchange_latency_s=e.target_exchange_latency_s)
        return {**bounds, "policy": {"policy_function": f"{POLICY_MODULE}:RouterAutoscalingPolicy",
                                     "policy_kwargs": {k: v for k, v in kwargs.items() if v is not None}}}

    def router_bounds(self) -> tuple[int, int]:
        """(min, max) router replicas: the groups' bounds when routers are expert groups."""
        if self.experts is not None:
            return self.experts.min_groups, self.experts.max_groups
        return self.router.min_replicas, self.router.max_replicas

    def check_app(self, fields_set: set[str], num_ingress_replicas: int, num_router_replicas: int,
                  transport: str = "local") -> None:
        """What an AppConfig with these settings must hold (ValueError otherwise): replica counts
        given explicitly are the initial replicas and lie within the bounds; `experts` needs routers
        that are whole expert groups (not the ray transport's shared shards)."""
        if self.experts is not None and transport == "ray":
            raise ValueError("autoscaling.experts scales router replicas as whole expert groups (transport local or "
                             "deepspeed: each replica holds or brings its own shards); under transport 'ray' every "
                             "router shares one fixed set of num_expert_shards shards, so there is no group to add: "
                             "drop autoscaling.experts (autoscaling.router still scales the routers)")
        router_min, router_max = self.router_bounds()
        for name, value, low, high in (
                ("num_ingress_replicas", num_ingress_replicas, self.ingress.min_replicas, self.ingress.max_replicas),
                ("num_router_replicas", num_router_replicas, router_min, router_max)):
            if name in fields_set and not low <= value <= high:
                raise ValueError(f"{name} ({value}) is the initial replica count under autoscaling and must lie "
                                 f"within [{low}, {high}]")


def replica_options(config: Any, deployment: str) -> dict[str, Any]:
    """Serve deployment options that size `deployment` ("ingress" or "router") of an AppConfig: a
    fixed `num_replicas` (`num_<deployment>_replicas`) without `config.autoscaling`; else its
    `autoscaling_config`, starting at `num_<deployment>_replicas` when that is set explicitly."""
    field = f"num_{deployment}_replicas"
    settings: AutoscalingSettings | None = config.autoscaling
    if settings is None:
        return {"num_replicas": getattr(config, field)}
    scaling = settings.ingress_config() if deployment == "ingress" else settings.router_config()
    if field in config.model_fields_set:
        scaling["initial_replicas"] = getattr(config, field)
    return {"autoscaling_config": scaling}


def _common(s: _Delays) -> dict[str, Any]:
    # Factors of 1: Serve then never rounds a whole-group decision to a partial one.
    out: dict[str, Any] = {"upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
                           "look_back_period_s": s.look_back_period_s,
                           "upscaling_factor": 1.0, "downscaling_factor": 1.0}
    if s.metrics_interval_s is not None:
        out["metrics_interval_s"] = s.metrics_interval_s
    return out


__all__ = [
    "EXCHANGE_LATENCY_KEY", "EXPERT_LOAD_KEY", "KV_USAGE_KEY", "RUNNING_KEY", "WAITING_KEY", "AutoscalingSettings",
    "ExpertGroupScaling", "ExpertLoadMeter",
    "IngressScaling", "RouterAutoscalingPolicy", "RouterScaling", "Signal", "decide_units", "replica_options",
    "router_autoscaling_stats",
]
