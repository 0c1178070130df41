"""The KV pool sized honestly: a fixed size on CPUs (setting or MOE_CLUSTER_CPU_KVCACHE_SPACE), a
share of the GPU less weights and activations on GPUs, and a context length that is "auto" or
refuses the start with the numbers when the pool cannot hold it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cluster import LLM
from cluster.engine.engine_config import EngineConfig, PoolSize, resolve_limits
from cluster.engine.kv_pool import CPU_KVCACHE_SPACE_ENV, GpuMemory, fixed_pool_bytes, gpu_pool_bytes
from cluster.errors import ConfigError, KVPoolTooSmallError
from cluster.model.config import load_model_config
from deployments.cli import main
from deployments.config import parse_config

# The tiny preset: 2 layers x (kv_lora 32 + rope 16) latents x 4 bytes (fp32) per token, 8,192 positions.
TINY_BYTES_PER_TOKEN = 384
TINY_MAX_POSITIONS = 8192
GiB = 2**30


def test_auto_is_the_checkpoints_limit_when_the_pool_holds_it(tiny_ckpt: Path) -> None:
    text = load_model_config(tiny_ckpt).text
    import torch

    limits = resolve_limits(EngineConfig(), text, torch.float32, PoolSize(GiB, "test", "kv_cache_bytes"))
    assert limits.max_model_len == TINY_MAX_POSITIONS
    assert limits.bytes_per_token == TINY_BYTES_PER_TOKEN and limits.num_kv_blocks == GiB // (16 * 384)


def test_auto_is_the_longest_that_fits_when_the_pool_is_smaller(tiny_ckpt: Path, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    with caplog.at_level(logging.INFO, logger="cluster.engine.llm_engine"):
        llm = LLM(tiny_ckpt, kv_cache_bytes=100 * 16 * TINY_BYTES_PER_TOKEN + 5)  # 100 blocks and a bit
    assert llm.engine is not None
    assert llm.engine.max_model_len == 1600 and llm.engine.blocks.num_blocks == 100
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "max_model_len 1,600 (auto: the pool holds fewer than the checkpoint's max_position_embeddings=8,192)" \
        in logged and "614,405 bytes (engine.kv_cache_bytes) at 384 bytes per token" in logged


def test_a_context_the_pool_cannot_hold_refuses_the_start_with_the_numbers(tiny_ckpt: Path) -> None:
    with pytest.raises(KVPoolTooSmallError) as err:
        LLM(tiny_ckpt, kv_cache_bytes=10 * 16 * TINY_BYTES_PER_TOKEN, max_model_len=1024)
    message = str(err.value)
    assert "max_model_len=1,024" in message and "61,440 bytes" in message and "384 bytes per token" in message
    assert "hold 160 tokens" in message and "raise kv_cache_bytes" in message


def test_a_context_beyond_the_checkpoint_refuses_the_start(tiny_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_model_len=8193 exceeds the checkpoint's max_position_embeddings=8192"):
        LLM(tiny_ckpt, num_kv_blocks=1024, max_model_len=TINY_MAX_POSITIONS + 1)


def test_a_pool_without_a_single_block_refuses_the_start(tiny_ckpt: Path) -> None:
    with pytest.raises(KVPoolTooSmallError, match=r"KV pool of 6,143 bytes .* holds no block of 16 tokens "
                                                  r"\(6,144 bytes at 384 bytes per token\)"):
        LLM(tiny_ckpt, kv_cache_bytes=16 * TINY_BYTES_PER_TOKEN - 1)


def test_the_cpu_pool_is_the_setting_then_the_environment_then_one_gib() -> None:
    assert fixed_pool_bytes(EngineConfig(), {}).bytes == GiB
    assert fixed_pool_bytes(EngineConfig(), {CPU_KVCACHE_SPACE_ENV: "2.5"}).bytes == int(2.5 * GiB)
    assert fixed_pool_bytes(EngineConfig(kv_cache_bytes=123), {CPU_KVCACHE_SPACE_ENV: "2"}).bytes == 123
    for bad in ("0", "-1", "lots", "inf"):
        with pytest.raises(ConfigError, match=CPU_KVCACHE_SPACE_ENV):
            fixed_pool_bytes(EngineConfig(), {CPU_KVCACHE_SPACE_ENV: bad})


def test_the_gpu_pool_is_the_share_less_weights_activations_and_memory_outside_torch() -> None:
    gb = 10**9
    memory = GpuMemory(total=100 * gb, free_at_start=95 * gb, weights=30 * gb, activation_peak=5 * gb,
                       non_torch=1 * gb)
    pool = gpu_pool_bytes(memory, 0.9)
    assert pool.bytes == 54 * gb and pool.field == "gpu_memory_utilization"
    assert gpu_pool_bytes(memory, 0.45).bytes == 9 * gb  # two engines on one GPU at 0.45 each


def test_the_gpu_share_must_be_free_and_must_leave_a_pool() -> None:
    gb = 10**9
    with pytest.raises(ConfigError, match=r"asks for 90,000,000,000 of the GPU's 100,000,000,000 bytes, but only "
                                          r"80,000,000,000 were free"):
        gpu_pool_bytes(GpuMemory(100 * gb, 80 * gb, 30 * gb, 5 * gb, gb), 0.9)
    with pytest.raises(KVPoolTooSmallError, match=r"gives this engine 40,000,000,000 bytes, and the weights "
                                                  r"\(30,000,000,000\), the activation peak \(9,000,000,000\)"):
        gpu_pool_bytes(GpuMemory(100 * gb, 95 * gb, 30 * gb, 9 * gb, gb), 0.4)


@pytest.mark.parametrize(("fields", "match"), [
    ({"num_kv_blocks": 8, "kv_cache_bytes": 1024}, "both size the KV pool"),
    ({"max_model_len": "big"}, 'max_model_len must be a positive integer or "auto"'),
    ({"max_model_len": 0}, 'max_model_len must be a positive integer or "auto"'),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
    ({"target_step_ms": 0}, "target_step_ms must be a positive number"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_engine_config_names_the_bad_field(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**fields)  # type: ignore[arg-type]


def test_the_serving_config_takes_auto_numbers_and_the_new_settings() -> None:
    engine = parse_config({"engine": {"max_model_len": "auto", "target_step_ms": 250, "gpu_memory_utilization": 0.5}
                           }).engine
    assert engine.to_engine_config() == EngineConfig(max_model_len="auto", target_step_ms=250.0,
                                                     gpu_memory_utilization=0.5)
    assert parse_config({"engine": {"max_model_len": 4096}}).engine.max_model_len == 4096
    for bad, field in (({"max_model_len": "big"}, "engine.max_model_len"),
                       ({"num_kv_blocks": 8, "kv_cache_bytes": 1024}, "both size the KV pool"),
                       ({"gpu_memory_utilization": 0}, "engine.gpu_memory_utilization")):
        with pytest.raises(ConfigError, match=field):
            parse_config({"engine": bad})


def test_serve_refuses_a_context_the_pool_cannot_hold_before_ray(tiny_ckpt: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--model", str(tiny_ckpt), "--max-model-len", "4096", "--kv-cache-bytes", "61440"])
    err = capsys.readouterr().err
    assert code == 2
    assert "max_model_len=4,096 does not fit the KV pool: 61,440 bytes (engine.kv_cache_bytes) at 384 bytes per " \
           "token hold 160 tokens" in err


def test_serve_takes_engine_flags_over_the_config_file(tmp_path: Path) -> None:
    from deployments.cli import _parser
    from deployments.serve_command import config_from_args

    path = tmp_path / "app.yaml"
    path.write_text("engine:\n  max_num_seqs: 8\n  max_model_len: 2048\n")
    args = _parser().parse_args(["serve", "--config", str(path), "--max-model-len", "auto", "--target-step-ms", "300"])
    engine = config_from_args(args).engine
    assert (engine.max_num_seqs, engine.max_model_len, engine.target_step_ms) == (8, "auto", 300.0)
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--max-model-len", "lots"])


def test_the_profile_step_leaves_no_scratch_cache(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, num_kv_blocks=8)
    assert llm.engine is not None
    runner = llm.engine.runner
    caches = runner.caches
    runner.profile_step(40, 16)
    assert runner.caches == []
    runner.caches = caches
