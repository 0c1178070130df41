"""Model configuration read from a Hugging Face `config.json` (mistral3 or bare mistral4)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import CheckpointError, ConfigError, UnsupportedCheckpointError


@dataclass(frozen=True)
class TextConfig:
    """The fields of `Mistral4Config` the engine uses; `raw` keeps the whole dict for rope."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    rope_interleave: bool
    max_position_embeddings: int
    hidden_act: str
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one token's entry in the MLA cache: compressed kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def hf_config(self) -> Any:
        """The `transformers` Mistral4Config for the same dict (used for rope, as the reference)."""
        from transformers import Mistral4Config

        return Mistral4Config.from_dict(dict(self.raw))


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "mistral3" or "mistral4"
    text: TextConfig
    vision: dict[str, Any] | None
    image_token_id: int | None
    spatial_merge_size: int
    dtype: str
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)


_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "n_shared_experts": 1,
    "n_routed_experts": 128,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "first_k_dense_replace": 0,
    "q_lora_rank": 1024,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_interleave": True,
    "max_position_embeddings": 1048576,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _positive(cfg: dict[str, Any], name: str, allow_zero: bool = False) -> int:
    value = cfg[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ConfigError(f"text_config.{name} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"integer, got {value!r}")
    return value


def parse_text_config(raw: dict[str, Any]) -> TextConfig:
    if raw.get("model_type", "mistral4") != "mistral4":
        raise UnsupportedCheckpointError(
            f"text_config.model_type is {raw.get('model_type')!r}; this engine runs 'mistral4'")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"text_config lacks required field(s): {', '.join(missing)}")
    cfg = {**_DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size", "intermediate_size"):
        _positive(cfg, name)
    for name in ("n_shared_experts", "first_k_dense_replace", "qk_nope_head_dim"):
        _positive(cfg, name, allow_zero=True)
    if cfg["q_lora_rank"] is not None:
        _positive(cfg, "q_lora_rank")
    if cfg["qk_rope_head_dim"] % 2:
        raise ConfigError("text_config.qk_rope_head_dim must be even (rope rotates pairs)")
    experts, groups = cfg["n_routed_experts"], cfg["n_group"]
    if experts % groups:
        raise ConfigError(f"text_config.n_routed_experts ({experts}) must be divisible by n_group ({groups})")
    if cfg["topk_group"] > groups:
        raise ConfigError(f"text_config.topk_group ({cfg['topk_group']}) exceeds n_group ({groups})")
    if cfg["num_experts_per_tok"] > experts:
        raise ConfigError(f"text_config.num_experts_per_tok ({cfg['num_experts_per_tok']}) exceeds "
                          f"n_routed_experts ({experts})")
    if experts // groups < 2 and groups > 1:
        raise ConfigError("text_config: each expert group needs at least 2 experts (groups score by top-2)")
    if cfg["num_experts_per_tok"] > cfg["topk_group"] * (experts // groups):
        raise ConfigError("text_config.num_experts_per_tok exceeds the experts in topk_group groups")
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if kv_heads != cfg["num_attention_heads"]:
        raise ConfigError("text_config.num_key_value_heads must equal num_attention_heads for MLA")
    if cfg["hidden_act"] != "silu":
        raise UnsupportedCheckpointError(f"text_config.hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    eos = cfg["eos_token_id"]
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return TextConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], moe_intermediate_size=cfg["moe_intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        n_shared_experts=cfg["n_shared_experts"], n_routed_experts=experts,
        num_experts_per_tok=cfg["num_experts_per_tok"], n_group=groups, topk_group=cfg["topk_group"],
        norm_topk_prob=bool(cfg["norm_topk_prob"]),
        routed_scaling_factor=float(cfg["routed_scaling_factor"]),
        first_k_dense_replace=cfg["first_k_dense_replace"], q_lora_rank=cfg["q_lora_rank"],
        kv_lora_rank=cfg["kv_lora_rank"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], v_head_dim=cfg["v_head_dim"],
        rms_norm_eps=float(cfg["rms_norm_eps"]), rope_interleave=bool(cfg["rope_interleave"]),
        max_position_embeddings=cfg["max_position_embeddings"], hidden_act=cfg["hidden_act"],
        attention_bias=bool(cfg["attention_bias"]), tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        bos_token_id=cfg["bos_token_id"], eos_token_id=eos_ids, raw=dict(raw),
    )


def _refuse_quantized(cfg: dict[str, Any], where: str) -> None:
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedCheckpointError(
            f"{where}quantization_config (quant_method={method!r}) is not supported yet: this engine "
            "loads unquantized (bf16/fp32) checkpoints only; FP8 support is a separate issue")


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    _refuse_quantized(raw, "")
    model_type = raw.get("model_type")
    if model_type == "mistral3":
        text_raw = raw.get("text_config")
        if not isinstance(text_raw, dict):
            raise ConfigError(f"{path}: model_type mistral3 needs a text_config object")
        _refuse_quantized(text_raw, "text_config.")
        vision = raw.get("vision_config")
        if vision is not None and vision.get("model_type", "pixtral") != "pixtral":
            raise UnsupportedCheckpointError(f"vision_config.model_type {vision.get('model_type')!r} is not pixtral")
        text = parse_text_config(text_raw)
        dtype = str(raw.get("dtype", text_raw.get("dtype", "float32")))
        return ModelConfig("mistral3", text, vision, raw.get("image_token_index", 10),
                           int(raw.get("spatial_merge_size", 2)), dtype, raw)
    if model_type == "mistral4":
        text = parse_text_config(raw)
        return ModelConfig("mistral4", text, None, None, 1, str(raw.get("dtype", "float32")), raw)
    raise UnsupportedCheckpointError(
        f"{path}: model_type {model_type!r} is not supported (expected 'mistral3' or 'mistral4')")
