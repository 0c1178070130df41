"""The autoscaling configuration: every bound and target, nested in AppConfig as `autoscaling`.
`AutoscalingSettings` (pydantic, at the edge) renders the `autoscaling_config` dicts Serve takes:
Serve's default policy for the ingress, `EngineAutoscalingPolicy` with its targets as
`policy_kwargs` for the engine servers (`deployments.telemetry.autoscaling`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from deployments.renamed_keys import with_new_names
from deployments.telemetry.autoscaling import POLICY_MODULE, EngineAutoscalingPolicy

POLICY_FUNCTION = f"{POLICY_MODULE}:{EngineAutoscalingPolicy.__name__}"


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


class EngineScaling(_Replicas):
    target_kv_usage: float = Field(0.75, gt=0, le=1)
    target_waiting: PositiveFloat = 2.0
    kv_usage_low: float | None = Field(None, ge=0, le=1)
    waiting_low: NonNegativeFloat | None = None
    max_step_down: PositiveInt = 1


class ExpertGroupScaling(_Delays):
    """Engine replicas that are whole expert groups (local and deepspeed transports): their bounds
    in groups and the expert targets that the engine policy weighs beside `engine`'s."""

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
    engine: EngineScaling = EngineScaling()
    experts: ExpertGroupScaling | None = None
    record_metrics: bool = True

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return with_new_names(data, {"router": "engine"}, "autoscaling.")

    def ingress_config(self) -> dict[str, Any]:
        s = self.ingress
        return {**_common(s), "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                "target_ongoing_requests": s.target_ongoing_requests}

    def engine_config(self) -> dict[str, Any]:
        """The EngineServer deployment's autoscaling_config: EngineAutoscalingPolicy on the engine
        targets, plus the expert targets with the bounds and delays in groups when `experts` is set."""
        s, e = self.engine, self.experts
        kwargs: dict[str, Any] = {
            "target_kv_usage": s.target_kv_usage, "target_waiting": s.target_waiting, "kv_usage_low": s.kv_usage_low,
            "waiting_low": s.waiting_low, "max_step_down": s.max_step_down, "record_metrics": self.record_metrics}
        if e is None:
            bounds: dict[str, Any] = {**_common(s), "min_replicas": s.min_replicas, "max_replicas": s.max_replicas}
        else:
            bounds = {**_common(e), "min_replicas": e.min_groups, "max_replicas": e.max_groups}
            kwargs.update(target_expert_load=e.target_expert_load, expert_low_ratio=e.low_ratio,
                          target_exchange_latency_s=e.target_exchange_latency_s)
        return {**bounds, "policy": {"policy_function": POLICY_FUNCTION,
                                     "policy_kwargs": {k: v for k, v in kwargs.items() if v is not None}}}

    def engine_bounds(self) -> tuple[int, int]:
        """(min, max) engine replicas: the groups' bounds when engine replicas are expert groups."""
        if self.experts is not None:
            return self.experts.min_groups, self.experts.max_groups
        return self.engine.min_replicas, self.engine.max_replicas

    def check_app(self, fields_set: set[str], num_ingress_replicas: int, num_engine_replicas: int,
                  transport: str = "local") -> None:
        """What an AppConfig with these settings must hold (ValueError otherwise): replica counts
        given explicitly are the initial replicas and lie within the bounds; `experts` needs engine
        replicas that are whole expert groups (not the ray transport's shared shards)."""
        if self.experts is not None and transport == "ray":
            raise ValueError("autoscaling.experts scales engine replicas as whole expert groups (transport local or "
                             "deepspeed: each replica holds or brings its own shards); under transport 'ray' every "
                             "engine shares one fixed set of num_expert_shards shards, so there is no group to add: "
                             "drop autoscaling.experts (autoscaling.engine still scales the engines)")
        engine_min, engine_max = self.engine_bounds()
        for name, value, low, high in (
                ("num_ingress_replicas", num_ingress_replicas, self.ingress.min_replicas, self.ingress.max_replicas),
                ("num_engine_replicas", num_engine_replicas, engine_min, engine_max)):
            if name in fields_set and not low <= value <= high:
                raise ValueError(f"{name} ({value}) is the initial replica count under autoscaling and must lie "
                                 f"within [{low}, {high}]")


def replica_options(config: Any, deployment: Literal["ingress", "engine"]) -> dict[str, Any]:
    """Serve deployment options that size `deployment` ("ingress" or "engine") of an AppConfig: a
    fixed `num_replicas` (`num_<deployment>_replicas`) without `config.autoscaling`; else its
    `autoscaling_config`, starting at `num_<deployment>_replicas` when that is set explicitly."""
    field = f"num_{deployment}_replicas"
    settings: AutoscalingSettings | None = config.autoscaling
    if settings is None:
        return {"num_replicas": getattr(config, field)}
    scaling = settings.ingress_config() if deployment == "ingress" else settings.engine_config()
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
