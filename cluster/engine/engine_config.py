"""Engine limits: KV pool, batch caps, context length. Every limit is explicit config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.block_manager import cache_bytes_per_block
from cluster.errors import ConfigError
from cluster.model.config import TextConfig


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step, prefill chunks and decodes together
    max_model_len: int | None = None  # None: the checkpoint's limit, capped by the KV pool
    enable_prefix_caching: bool = True  # reuse the cached KV blocks of a prompt's longest cached prefix

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")


@dataclass(frozen=True)
class ResolvedLimits:
    num_kv_blocks: int
    max_model_len: int


def resolve_limits(config: EngineConfig, text: TextConfig, dtype: torch.dtype) -> ResolvedLimits:
    blocks = config.num_kv_blocks or config.kv_cache_bytes // cache_bytes_per_block(text, config.block_size, dtype)
    if blocks < 1:
        raise ConfigError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {config.block_size} tokens")
    capacity = blocks * config.block_size
    if config.max_model_len is None:
        return ResolvedLimits(blocks, min(text.max_position_embeddings, capacity))
    if config.max_model_len > text.max_position_embeddings:
        raise ConfigError(f"max_model_len={config.max_model_len} exceeds the checkpoint's "
                          f"max_position_embeddings={text.max_position_embeddings}")
    if config.max_model_len > capacity:
        raise ConfigError(f"max_model_len={config.max_model_len} does not fit the KV pool "
                          f"({blocks} blocks x {config.block_size} = {capacity} tokens); raise "
                          "num_kv_blocks / kv_cache_bytes or lower max_model_len")
    return ResolvedLimits(blocks, config.max_model_len)
