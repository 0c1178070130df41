"""Checkpoint presets: small random models of the exact Mistral Small 4 architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.errors import ConfigError

VOCAB_SIZE = 131072  # Tekken's, so the real tokenizer fits every preset


def yarn(original: int, factor: float, rope_dim: int, head_dim: int) -> dict[str, Any]:
    return {
        "rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": factor,
        "original_max_position_embeddings": original, "max_position_embeddings": int(original * factor),
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1, "partial_rotary_factor": rope_dim / head_dim,
    }


@dataclass(frozen=True)
class Preset:
    name: str
    text: dict[str, Any]
    vision: dict[str, Any]
    spatial_merge_size: int = 2
    max_image_size: int = 256
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _text(hidden: int, layers: int, heads: int, q_lora: int, kv_lora: int, rope: int, nope: int, v: int,
          experts: int, top_k: int, moe_inter: int, inter: int, original: int, factor: float,
          init: float) -> dict[str, Any]:
    return {
        "model_type": "mistral4", "vocab_size": VOCAB_SIZE, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "q_lora_rank": q_lora, "kv_lora_rank": kv_lora, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
        "v_head_dim": v, "n_routed_experts": experts, "num_experts_per_tok": top_k, "n_shared_experts": 1,
        "moe_intermediate_size": moe_inter, "intermediate_size": inter, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 0, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "max_position_embeddings": int(original * factor), "rope_interleave": True,
        "rope_parameters": yarn(original, factor, rope, rope + nope), "initializer_range": init,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
    }


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        _text(hidden=64, layers=2, heads=4, q_lora=32, kv_lora=32, rope=16, nope=16, v=32, experts=16,
              top_k=4, moe_inter=32, inter=128, original=512, factor=16.0, init=0.08),
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "head_dim": 16, "patch_size": 16, "image_size": 256, "initializer_range": 0.08},
        description="seconds to build and run; YaRN boundary every 512 positions"),
    "bench": Preset(
        "bench",
        _text(hidden=256, layers=16, heads=4, q_lora=128, kv_lora=64, rope=32, nope=32, v=64, experts=16,
              top_k=4, moe_inter=1024, inter=2048, original=4096, factor=8.0, init=0.04),
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "head_dim": 16, "patch_size": 16, "image_size": 512, "initializer_range": 0.04},
        max_image_size=512,
        description="routed experts >= half the per-token FLOPs (lm_head counted), 16 experts top-4"),
    "small": Preset(
        "small",
        _text(hidden=256, layers=2, heads=4, q_lora=128, kv_lora=64, rope=32, nope=32, v=64, experts=16,
              top_k=4, moe_inter=256, inter=1024, original=4096, factor=8.0, init=0.04),
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "head_dim": 16, "patch_size": 16, "image_size": 256, "initializer_range": 0.04},
        description="little compute per token, so per-step engine overhead shows (engine benchmark)"),
    # YaRN factor 513 over 512 original positions, as Mistral Small 4's factor 128 over 8,192 gives
    # its 1,048,576: 262,656 positions, a 262,144-token prompt and one 512-position period for its
    # answer; the llama-4 query scaling steps every 512 positions.
    "long": Preset(
        "long",
        _text(hidden=64, layers=1, heads=1, q_lora=32, kv_lora=32, rope=16, nope=16, v=32, experts=4,
              top_k=2, moe_inter=32, inter=64, original=512, factor=513.0, init=0.08),
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "head_dim": 16, "patch_size": 16, "image_size": 256, "initializer_range": 0.08},
        description="262,656 positions (YaRN 513 x 512) on 1 layer and 1 head: 256K-token prompts on CPUs"),
    # Mistral Small 4's layer sizes (transformers' Mistral4Config defaults) on 8 of its 36 layers:
    # the GPU check's speed stage (ops/bench/gpu_check.py) with dummy weights, bf16 and FP8.
    "gpu-bench": Preset(
        "gpu-bench",
        _text(hidden=4096, layers=8, heads=32, q_lora=1024, kv_lora=256, rope=64, nope=64, v=128, experts=128,
              top_k=4, moe_inter=2048, inter=12288, original=8192, factor=128.0, init=0.02),
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "head_dim": 16, "patch_size": 16, "image_size": 256, "initializer_range": 0.02},
        description="real layer sizes (hidden 4096, 32 heads, kv_lora 256, rope 64, 128 experts of 2048, "
                    "top-4, 1 shared), 8 layers: GPU speed with load_format dummy"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
