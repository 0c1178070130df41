"""How many bytes an engine's KV pool takes.

- Set (`kv_cache_bytes`, or `num_kv_blocks`): that, on any device.
- CPUs: a fixed size per engine, because several replicas share one host's RAM:
  `MOE_CLUSTER_CPU_KVCACHE_SPACE` GiB (as vLLM's `VLLM_CPU_KVCACHE_SPACE`), 1 GiB when unset.
- GPUs: as vLLM, the engine may take `gpu_memory_utilization` of the device's memory; the pool
  is what that leaves after this engine's weights, the activation peak of a profile step of
  `max_num_batched_tokens` tokens, and what the process took outside torch's allocator (the
  CUDA context). The share must be free when the engine starts (other processes' memory is
  theirs), so two engines can split a GPU at 0.45 each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cluster.engine.engine_config import EngineConfig, PoolSize, ResolvedLimits, resolve_limits
from cluster.errors import ConfigError, KVPoolTooSmallError
from cluster.model.config import TextConfig

if TYPE_CHECKING:
    from cluster.engine.model_runner import ModelRunner

CPU_KVCACHE_SPACE_ENV = "MOE_CLUSTER_CPU_KVCACHE_SPACE"  # GiB per engine on CPUs
DEFAULT_CPU_KVCACHE_GIB = 1.0


@dataclass(frozen=True)
class GpuMemory:
    """What one engine's start measured on its GPU, in bytes."""

    total: int
    free_at_start: int  # free on the device before this engine loaded anything
    weights: int  # torch's allocated bytes once the weights are loaded
    activation_peak: int  # the profile step's peak above the weights
    non_torch: int  # what the process took outside torch's allocator meanwhile (CUDA context, libraries)


def gpu_pool_bytes(memory: GpuMemory, utilization: float) -> PoolSize:
    """The pool from `utilization` of the device, less the weights, the activation peak and the
    memory outside torch; refuses a share that is not free or that leaves nothing."""
    budget = int(memory.total * utilization)
    source = f"gpu_memory_utilization={utilization} of {memory.total:,} bytes"
    if budget > memory.free_at_start:
        raise ConfigError(f"gpu_memory_utilization={utilization} asks for {budget:,} of the GPU's {memory.total:,} "
                          f"bytes, but only {memory.free_at_start:,} were free when the engine started (other "
                          "processes hold the rest); lower gpu_memory_utilization")
    pool = budget - memory.weights - memory.activation_peak - memory.non_torch
    if pool <= 0:
        raise KVPoolTooSmallError(
            f"gpu_memory_utilization={utilization} gives this engine {budget:,} bytes, and the weights "
            f"({memory.weights:,}), the activation peak ({memory.activation_peak:,}) and memory outside torch "
            f"({memory.non_torch:,}) leave nothing for the KV pool; raise gpu_memory_utilization or lower "
            "max_num_batched_tokens")
    return PoolSize(pool, source, "gpu_memory_utilization")


def fixed_pool_bytes(config: EngineConfig, environ: Mapping[str, str]) -> PoolSize:
    """`kv_cache_bytes` when set, else `MOE_CLUSTER_CPU_KVCACHE_SPACE` GiB, else 1 GiB."""
    if config.kv_cache_bytes is not None:
        return PoolSize(config.kv_cache_bytes, "engine.kv_cache_bytes", "kv_cache_bytes")
    raw = environ.get(CPU_KVCACHE_SPACE_ENV)
    if raw is None or not raw.strip():
        return PoolSize(int(DEFAULT_CPU_KVCACHE_GIB * 2**30), f"the CPU default of {DEFAULT_CPU_KVCACHE_GIB:g} GiB",
                        f"kv_cache_bytes (or {CPU_KVCACHE_SPACE_ENV}, GiB)")
    try:
        gib = float(raw)
    except ValueError:
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise ConfigError(f"{CPU_KVCACHE_SPACE_ENV}={raw!r} must be a positive number of GiB")
    return PoolSize(int(gib * 2**30), f"{CPU_KVCACHE_SPACE_ENV}={raw.strip()} GiB",
                    f"{CPU_KVCACHE_SPACE_ENV} (or kv_cache_bytes)")


def free_at_start(device: torch.device) -> int | None:
    """Free bytes on a GPU before the engine loads anything (None on other devices). What this
    process's torch already holds counts as free: the in-process experts, loaded before the
    engine, are this engine's weights, not another process's memory."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)


def size_pool(config: EngineConfig, runner: ModelRunner, free_before_load: int | None) -> PoolSize | None:
    """The pool of an engine whose weights `runner` holds (None: `num_kv_blocks` sizes it in
    blocks). On a GPU with no size set this runs a profile step of `max_num_batched_tokens`
    tokens first, to measure the activation peak."""
    if config.num_kv_blocks is not None:
        return None
    if runner.device.type != "cuda" or config.kv_cache_bytes is not None:
        return fixed_pool_bytes(config, os.environ)
    if free_before_load is None:
        raise RuntimeError("sizing a GPU pool needs free_at_start(), taken before the weights load")
    return gpu_pool_bytes(measure_gpu(runner, config, free_before_load), config.gpu_memory_utilization)


def measure_gpu(runner: ModelRunner, config: EngineConfig, free_before_load: int) -> GpuMemory:
    device = runner.device
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.profile_step(config.max_num_batched_tokens, config.block_size)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - weights
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(free_before_load - free - torch.cuda.memory_reserved(device), 0)
    return GpuMemory(total, free_before_load, weights, peak, non_torch)


def limits_before_start(config: EngineConfig, text: TextConfig) -> ResolvedLimits | None:
    """What an engine's start will resolve, from config.json and the engine config alone (the
    cache is in the engine's dtype): `moe-cluster serve` refuses a bad `max_model_len` with it
    before Ray starts. None where only the GPU's measurement can tell."""
    if config.num_kv_blocks is None and config.kv_cache_bytes is None and config.device_type() == "cuda":
        return None
    pool = None if config.num_kv_blocks is not None else fixed_pool_bytes(config, os.environ)
    return resolve_limits(config, text, config.torch_dtype, pool)
