"""The serving configuration: one typed object from a YAML/JSON file, CLI flags or a Serve config's
`args`, validated at the edge; everything inside reads it as plain attributes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from cluster.errors import ConfigError
from deployments.renamed_keys import with_new_names
from deployments.settings import ImageSettings, RoutingSettings, VisionSettings
from deployments.telemetry.autoscaling_settings import AutoscalingSettings

if TYPE_CHECKING:
    from cluster.engine.engine_config import EngineConfig


# The gRPC proxy's servicers (Serve's `grpc_options`), for `moe-cluster serve` and written Serve configs.
GRPC_SERVICER_FUNCTIONS = [
    "deployments.grpc.registration.add_moe_cluster_to_server",
    "deployments.grpc.registration.add_health_to_server",
    # Not a service: fixes cancellation of streaming calls in Serve's proxy (see the module).
    "deployments.grpc.proxy_fix.add_stream_cancellation_to_server",
]


class EngineSettings(BaseModel):
    """The engine's limits (see cluster.engine.engine_config.EngineConfig)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: PositiveInt = 16
    num_kv_blocks: PositiveInt | None = Field(None, description="a fixed KV pool in blocks (instead of bytes)")
    kv_cache_bytes: PositiveInt | None = Field(
        None, description="the KV pool's bytes per engine; unset: on CPUs MOE_CLUSTER_CPU_KVCACHE_SPACE GiB (1 by "
                          "default), on GPUs what gpu_memory_utilization leaves after weights and activations")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of the GPU's memory an engine may take")
    max_num_seqs: PositiveInt = 64
    max_num_batched_tokens: PositiveInt = 512
    max_model_len: PositiveInt | Literal["auto"] = Field(
        "auto", description='"auto": the checkpoint\'s max_position_embeddings if the KV pool holds one such sequence, '
                            "else the longest that fits; a number the pool cannot hold refuses the start")
    target_step_ms: PositiveFloat | None = Field(
        None, description="a prefill budget per step keeps a step's time near this (decodes first); None: the token "
                          "cap alone")
    min_prefill_tokens: PositiveInt = Field(32, description="a prefill advances at least this much every step")
    enable_prefix_caching: bool = Field(True, description="reuse the cached KV blocks of a prompt's longest cached "
                                                          "prefix (shared system prompts, later chat turns)")
    device: str | None = Field(None, description='where an engine computes: "cpu", "cuda", "cuda:1"; unset: CUDA '
                                                 "where visible, else the CPU (under transport local the routed "
                                                 "experts live there too)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the engine's compute and KV dtype; unset: bfloat16 on CUDA, float32 elsewhere")
    attention_backend: Literal["torch", "triton"] | None = Field(
        None, description="the attention kernels; unset: triton on CUDA where it imports, else torch")
    enforce_eager: bool = Field(False, description="decode steps run eagerly, never as captured CUDA graphs")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description='"dummy": random weights from config.json alone (benchmarks; transport local)')

    @model_validator(mode="after")
    def _one_pool_size(self) -> EngineSettings:
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ValueError("num_kv_blocks and kv_cache_bytes both size the KV pool: set one of them")
        return self

    def to_engine_config(self) -> EngineConfig:
        from cluster.engine.engine_config import EngineConfig  # torch: only where an engine is built

        return EngineConfig(**self.model_dump())


# Deprecated top-level keys (old -> new): "router" meant the deployment that runs an engine.
RENAMED_KEYS = {"num_router_replicas": "num_engine_replicas", "router_num_cpus": "engine_num_cpus",
                "router_num_gpus": "engine_num_gpus"}


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="model directory; None serves the embedded tiny checkpoint")
    served_model_name: str | None = Field(None, description="the `model` id of the API; default: the directory name")
    app_name: str = "moe-cluster"
    route_prefix: str = "/"
    engine: EngineSettings = EngineSettings()
    transport: Literal["local", "ray", "deepspeed"] = Field(
        "local", description="expert dispatch transport of the engines: local (experts in the engine's process), "
                             "ray (engine replicas share expert shards), deepspeed (a group per engine replica)")
    num_expert_shards: int = Field(0, ge=0, description="expert shard actors (ray/deepspeed transports; with "
                                                        "local, in-process shards)")
    exchange_deadline_s: PositiveFloat = Field(30.0, description="deadline of one expert exchange; a shard "
                                                                 "missing it is replaced and the step re-run")
    expert_placement_timeout_s: PositiveFloat = Field(
        45.0, description="how long the expert shards' placement group may wait for resources before the "
                          "deployment is refused with what was asked and what is free")

    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    grpc_reflection: bool = Field(False, description="serve grpc.reflection.v1alpha on the gRPC port")
    grpc_max_message_bytes: PositiveInt = 4 * 2**20
    api_keys: tuple[str, ...] = Field((), description="bearer keys; empty: no authentication")

    max_body_bytes: PositiveInt = 8 * 2**20
    max_ongoing_requests: PositiveInt = Field(64, description="generation requests in flight per ingress replica; "
                                                              "more are refused (HTTP 429, RESOURCE_EXHAUSTED)")
    max_queued_requests: int = Field(64, ge=-1, description="requests Serve queues before an ingress replica; "
                                                            "-1: unbounded")
    retry_after_s: PositiveInt = 1
    graceful_shutdown_timeout_s: PositiveFloat = Field(
        30.0, description="how long requests in flight may run on when a replica stops (a redeploy, a downscale) or "
                          "`moe-cluster serve` gets SIGTERM (new requests then get 503 / UNAVAILABLE)")
    request_timeout_s: PositiveFloat | None = Field(None, description="end-to-end limit set on Serve's proxies")
    max_tokens: PositiveInt = Field(4096, description="largest max_tokens a request may ask for")
    default_completion_tokens: PositiveInt = Field(16, description="/v1/completions max_tokens when unset")
    max_n: PositiveInt = Field(8, description="largest n (choices per prompt) and prompts per request")
    prompt_token_budget: PositiveInt = Field(2**20, description="prompt tokens (x n) of the requests in flight "
                                                              "per ingress replica; a request past it gets 429")
    images: ImageSettings = ImageSettings()
    vision: VisionSettings = VisionSettings()
    routing: RoutingSettings = RoutingSettings()

    num_ingress_replicas: PositiveInt = 1
    num_engine_replicas: PositiveInt = 1
    ingress_num_cpus: NonNegativeFloat = 0.5
    engine_num_cpus: NonNegativeFloat = 1.0
    engine_num_gpus: NonNegativeFloat = 0.0
    shard_num_gpus: NonNegativeFloat = Field(
        0.0, description="GPUs each expert shard asks Ray for (transports ray and deepspeed); > 0: its experts and "
                         "exchange buffers live on its GPU (deepspeed: NCCL, with engine_num_gpus > 0 too)")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="replica bounds and targets: ingress on ongoing requests, engines on KV use and waiting "
                          "queue (docs/OPERATIONS.md); None: fixed num_*_replicas")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return with_new_names(data, RENAMED_KEYS)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple) and any(not isinstance(k, str) or not k.strip() for k in value):
            raise ValueError("api keys must be non-empty strings")
        return tuple(value) if isinstance(value, list) else value

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or (len(value) > 1 and value.endswith("/")):
            raise ValueError("route_prefix must start with '/' and not end with one (unless it is '/')")
        return value

    @model_validator(mode="after")
    def _shard_gpus(self) -> AppConfig:
        if self.shard_num_gpus > 0 and self.transport == "local":
            raise ValueError("shard_num_gpus is for expert shard actors (transport ray or deepspeed); under "
                             "transport local the experts live on the engine's device (engine_num_gpus)")
        if self.transport == "deepspeed" and (self.shard_num_gpus > 0) != (self.engine_num_gpus > 0):
            raise ValueError("transport deepspeed exchanges over NCCL on GPUs or gloo on CPUs, not a mix: set "
                             "engine_num_gpus and shard_num_gpus both > 0, or both 0")
        return self

    @model_validator(mode="after")
    def _autoscaling(self) -> AppConfig:
        if self.autoscaling is not None:
            self.autoscaling.check_app(self.model_fields_set, self.num_ingress_replicas, self.num_engine_replicas,
                                       self.transport)
        return self

    @property
    def engine_max_ongoing_requests(self) -> int:
        # Every ingress replica may hold max_ongoing_requests requests of up to max_n streams each,
        # so admitted work never waits in a handle queue; headroom for stats/info calls.
        ingress = self.autoscaling.ingress.max_replicas if self.autoscaling else self.num_ingress_replicas
        return ingress * self.max_ongoing_requests * self.max_n + 16

    @property
    def ingress_max_ongoing_requests(self) -> int:
        # Above the app's own admission limit, so that its fast 429 (and health probes) win over
        # Serve queueing at the proxy.
        return self.max_ongoing_requests + 32


def load_config(path: str | Path | None = None, **overrides: Any) -> AppConfig:
    """Reads a YAML or JSON file (if given) and applies `overrides` whose value is not None (a
    dict merges into the file's section of that name)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        data = _app_args(path, loaded) if loaded and "applications" in loaded else dict(loaded or {})
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # a section's keys over the file's (e.g. engine.max_model_len)
        elif value is not None:
            data[key] = value
    return parse_config(data)


def _app_args(path: str | Path, serve_config: dict[str, Any]) -> dict[str, Any]:
    """A Serve config file (deployments/serve_config.yaml, `moe-cluster plan --write-config`): the
    args of its one application."""
    apps = serve_config["applications"]
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"config file {path} is a Serve config; `moe-cluster serve` takes one with exactly one "
                          "application")
    args = apps[0].get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"config file {path}: applications[0].args must be a mapping of AppConfig fields")
    return dict(args)


def parse_config(data: dict[str, Any]) -> AppConfig:
    from pydantic import ValidationError

    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config: {problems}") from exc


def resolve_model_dir(model: str | None) -> Path:
    if model is None:
        from cluster.testing.embedded import embedded_checkpoint

        return embedded_checkpoint()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model directory {path} does not exist")
    return path


def served_name(config: AppConfig, model_dir: Path) -> str:
    if config.served_model_name:
        return config.served_model_name
    return "moe-cluster-embedded" if config.model is None else model_dir.name


API_KEYS_ENV = "MOE_CLUSTER_API_KEYS"


def api_keys_from_env() -> tuple[str, ...]:
    """Bearer keys from `MOE_CLUSTER_API_KEYS` (comma-separated; keeps keys out of command lines
    and Serve config files, e.g. from a Kubernetes Secret)."""
    import os

    return tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
