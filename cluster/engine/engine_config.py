"""Engine limits: KV pool, batch caps, context length, the step-time target. Every limit is
explicit config, and what the engine makes of them (`ResolvedLimits`) is logged at start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cluster.engine.block_manager import cache_bytes_per_block
from cluster.errors import ConfigError, KVPoolTooSmallError
from cluster.model.config import TextConfig
from cluster.model.weight_source import LOAD_FORMATS

MaxModelLen = int | Literal["auto"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # a fixed block count instead of a byte size (tests, benchmarks)
    # The pool's bytes on any device. None: on CPUs MOE_CLUSTER_CPU_KVCACHE_SPACE GiB (1 by default),
    # on GPUs what gpu_memory_utilization leaves (cluster/engine/kv_pool.py).
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory this engine may take, as vLLM's
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step, prefill chunks and decodes together
    # "auto": the checkpoint's max_position_embeddings if the pool holds one such sequence, else
    # the longest that fits. A number the pool cannot hold refuses the start.
    max_model_len: MaxModelLen = "auto"
    enable_prefix_caching: bool = True  # reuse the cached KV blocks of a prompt's longest cached prefix
    # A prefill budget per step keeps a step's time near this (decodes first; None: the token cap
    # alone); a prefill still advances by at least min_prefill_tokens every step.
    target_step_ms: float | None = None
    min_prefill_tokens: int = 32
    # None: "cuda" where CUDA is visible, else "cpu". Weights, the KV pool, step inputs, sampling
    # and (under transport "local") the routed experts live there.
    device: str | None = None
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None: bfloat16 on CUDA, float32 elsewhere
    attention_backend: str | None = None  # ATTENTION_BACKENDS; None: "triton" on CUDA where importable, else "torch"
    enforce_eager: bool = False  # True: decode steps run eagerly, never as captured CUDA graphs
    load_format: str = "auto"  # "auto": the checkpoint's weights; "dummy": random weights from config.json alone

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "min_prefill_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_bytes"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name), "or None")
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks} and kv_cache_bytes={self.kv_cache_bytes} both "
                              "size the KV pool: set one of them")
        if self.max_model_len != "auto":
            _positive_int("max_model_len", self.max_model_len, 'or "auto"')
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        util = self.gpu_memory_utilization
        if not isinstance(util, int | float) or isinstance(util, bool) or not 0 < util <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        target = self.target_step_ms
        if target is not None and (not isinstance(target, int | float) or isinstance(target, bool) or target <= 0):
            raise ConfigError(f"target_step_ms must be a positive number of milliseconds or None, got {target!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(f"device must be a device name such as 'cpu' or 'cuda:0', got {self.device!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ConfigError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if self.attention_backend is not None and not isinstance(self.attention_backend, str):
            raise ConfigError(f"attention_backend must be a backend name or None, got {self.attention_backend!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype: `dtype`, else bfloat16 on CUDA and float32 elsewhere."""
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.device_type() == "cuda" else torch.float32

    def device_type(self) -> str:
        """"cuda" or "cpu" (...) as `resolved_device` would give, without asking that the device be
        here: a head node without GPUs plans for engines that will have them."""
        name = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(name).type
        except RuntimeError as exc:
            raise ConfigError(f"device {self.device!r} is not a torch device: {exc}") from exc

    def resolved_device(self) -> torch.device:
        """`device`, else CUDA where it is visible and the CPU elsewhere."""
        self.device_type()  # a name torch knows
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} asked for, but torch sees no CUDA device (torch "
                              f"{torch.__version__}; install a CUDA build of torch, or set device 'cpu')")
        return device

    def resolved_attention_backend(self) -> str:
        """`attention_backend`, else "triton" on CUDA where triton imports and "torch" elsewhere."""
        if self.attention_backend is not None:
            return self.attention_backend
        if self.resolved_device().type != "cuda":
            return "torch"
        from cluster.model import mla_triton

        return "triton" if mla_triton.available() else "torch"

    def uses_cuda_graphs(self, transport: str = "local") -> bool:
        """Decode steps replay captured CUDA graphs: on CUDA, under the local transport, unless
        `enforce_eager` (a remote exchange leaves the device every MoE layer, so it cannot be captured)."""
        return not self.enforce_eager and transport == "local" and self.resolved_device().type == "cuda"


def _positive_int(name: str, value: object, alternative: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{' ' + alternative if alternative else ''}, "
                          f"got {value!r}")


@dataclass(frozen=True)
class PoolSize:
    bytes: int
    source: str  # where the size comes from, for messages: "engine.kv_cache_bytes", "gpu_memory_utilization=0.9 ..."
    field: str  # the setting that raises it


@dataclass(frozen=True)
class ResolvedLimits:
    num_kv_blocks: int
    max_model_len: int
    pool: PoolSize
    bytes_per_token: int
    block_size: int
    how: str  # how max_model_len was set, for the log line

    @property
    def tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_kv_blocks * self.block_size

    def describe(self) -> str:
        return (f"KV pool {self.pool.bytes:,} bytes ({self.pool.source}) at {self.bytes_per_token:,} bytes per token: "
                f"{self.num_kv_blocks:,} blocks of {self.block_size} = {self.tokens:,} tokens; "
                f"max_model_len {self.max_model_len:,} ({self.how})")


def resolve_limits(config: EngineConfig, text: TextConfig, dtype: torch.dtype,
                   pool: PoolSize | None) -> ResolvedLimits:
    """Blocks from the pool's bytes (`cluster.engine.kv_pool.size_pool`; None: `num_kv_blocks`),
    and the context length: "auto", or a number the pool and the checkpoint both allow. Refusals
    name the numbers."""
    per_block = cache_bytes_per_block(text, config.block_size, dtype)
    per_token = per_block // config.block_size
    if pool is None:
        if config.num_kv_blocks is None:
            raise ConfigError("the KV pool needs a size: kv_cache_bytes or num_kv_blocks")
        pool = PoolSize(config.num_kv_blocks * per_block, f"engine.num_kv_blocks={config.num_kv_blocks}",
                        "num_kv_blocks")
    blocks = pool.bytes // per_block
    if blocks < 1:
        raise KVPoolTooSmallError(f"the KV pool of {pool.bytes:,} bytes ({pool.source}) holds no block of "
                                  f"{config.block_size} tokens ({per_block:,} bytes at {per_token:,} bytes per token); "
                                  f"raise {pool.field}")
    capacity = blocks * config.block_size
    limit = text.max_position_embeddings
    if config.max_model_len == "auto":
        how = ("auto: the checkpoint's max_position_embeddings" if capacity >= limit else
               f"auto: the pool holds fewer than the checkpoint's max_position_embeddings={limit:,}")
        return ResolvedLimits(blocks, min(limit, capacity), pool, per_token, config.block_size, how)
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len={config.max_model_len} exceeds the checkpoint's "
                          f"max_position_embeddings={limit}")
    if config.max_model_len > capacity:
        raise KVPoolTooSmallError(
            f"max_model_len={config.max_model_len:,} does not fit the KV pool: {pool.bytes:,} bytes ({pool.source}) "
            f"at {per_token:,} bytes per token hold {capacity:,} tokens ({blocks:,} blocks of {config.block_size}); "
            f"raise {pool.field}, or lower max_model_len to at most {capacity:,} (or set it to \"auto\")")
    return ResolvedLimits(blocks, config.max_model_len, pool, per_token, config.block_size, "engine.max_model_len")
