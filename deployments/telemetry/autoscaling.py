"""The autoscaling policy of the engine servers, and the decision rules it applies.

- Ingress: Serve's default policy on ongoing requests (`target_ongoing_requests`).
- Engine servers: `EngineAutoscalingPolicy`, a deployment-level Ray Serve policy fed by the
  replicas' own stats (`EngineServer.record_autoscaling_stats()` returns the signals of
  `deployments.telemetry.signals`): scale up when the mean KV use or the mean waiting queue is
  over its target, down when both are well under, hold in between.
- Expert groups: under the `deepspeed` transport an engine replica brings its own group of expert
  shards that steps in lockstep with it (under `local` the experts live in the engine's process),
  so an engine replica *is* a whole expert group and scaling engines scales groups as units. With
  `autoscaling.experts` set, `EngineAutoscalingPolicy` also weighs the expert load per shard and
  the mean exchange latency that each replica reports, and the engine bounds become
  `min_groups` / `max_groups`. Under the `ray` transport every engine shares one fixed set of
  shards (`num_expert_shards`), so there is no group to add: `autoscaling.experts` is refused.

The bounds and targets are configuration (`deployments.telemetry.autoscaling_settings`), handed
to the policy as `policy_kwargs`. Serve instantiates a class policy once with those kwargs and then
calls it with an `AutoscalingContext` every control-loop tick; around it Serve applies
`upscale_delay_s` / `downscale_delay_s`, the scaling factors and min/max replicas.

This module runs in the Serve controller: it must not import torch or the `cluster` package.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployments.telemetry.metrics import MetricSet
from deployments.telemetry.recorders import AutoscalingMetrics
from deployments.telemetry.signals import EXCHANGE_LATENCY_KEY, EXPERT_LOAD_KEY, KV_USAGE_KEY, WAITING_KEY

logger = logging.getLogger("ray.serve")

POLICY_MODULE = __name__


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


def _bounds(ctx: Any, min_units: int | None, max_units: int | None) -> tuple[int, int]:
    """The tighter of the deployment's (capacity-adjusted) min/max replicas and the policy's own."""
    lower = int(ctx.capacity_adjusted_min_replicas)
    upper = int(ctx.capacity_adjusted_max_replicas)
    if min_units is not None:
        lower = max(lower, min_units)
    if max_units is not None:
        upper = min(upper, max_units)
    return lower, max(lower, upper)


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
                self._metrics = AutoscalingMetrics(MetricSet())
            self._metrics.record(ctx.app_name or "", ctx.deployment_name, wanted, upper, signals)
        except Exception:
            logger.warning("autoscaling: recording metrics failed; not recording any more", exc_info=True)
            self.enabled = False


# ---------------------------------------------------------------------------------------------
# Policies (Serve instantiates them with policy_kwargs)
# ---------------------------------------------------------------------------------------------

class EngineAutoscalingPolicy:
    """Deployment-level policy for engine servers on replica-reported KV use and waiting queue, and
    (for engine replicas that are whole expert groups) expert load per shard and exchange latency.

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
        for key, target in ((EXPERT_LOAD_KEY, self.target_expert_load),
                            (EXCHANGE_LATENCY_KEY, self.target_exchange_latency_s)):
            mean = _mean(metrics.get(key)) if target is not None else None
            if target is not None and mean is not None:
                out.append(Signal(key, mean, target, target * self.expert_low_ratio))
        return out

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        signals = self.signals(ctx)
        lower, upper = _bounds(ctx, self.min_replicas, self.max_replicas)
        decision, wish, why = decide_units(signals, ctx.current_num_replicas, ctx.target_num_replicas,
                                           lower, upper, self.max_step_down)
        self._record(ctx, wish, upper, {s.name: s.value for s in signals})
        state = dict(ctx.policy_state or {})
        state.update(engine_decision=decision, engine_why=why)
        return decision, state
