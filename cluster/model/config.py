"""Model configuration read from a Hugging Face `config.json` (mistral3 or bare mistral4) through
transformers' own config classes (`Mistral3Config`, `Mistral4Config`, `PixtralVisionConfig`), so
every default and meaning is transformers'. The engine's checks on top of them raise
`ConfigError` naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import CheckpointError, ConfigError, UnsupportedCheckpointError
from cluster.model.quantization import Quantization, parse_quantization


@dataclass(frozen=True)
class TextConfig:
    """The `Mistral4Config` values the engine uses (transformers' defaults filled in); `raw` is
    transformers' full dict of it, `hf_config()` the object itself."""

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
    # Whether lm_head is the embedding matrix, by transformers' rule for the whole model: the
    # top-level flag of a mistral3 config (default true), a bare mistral4's own (default false).
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)
    hf: Any = field(repr=False, compare=False, hash=False)  # transformers' Mistral4Config

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
        """transformers' Mistral4Config (used for rope, as the reference)."""
        return self.hf


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "mistral3" or "mistral4"
    text: TextConfig
    vision: dict[str, Any] | None  # transformers' PixtralVisionConfig as a dict (defaults filled); None for mistral4
    image_token_id: int | None
    spatial_merge_size: int
    dtype: str  # transformers' `dtype` of the checkpoint ("float32", "bfloat16", ...)
    quantization: Quantization | None
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)
    hf: Any = field(default=None, repr=False, compare=False, hash=False)  # Mistral3Config or Mistral4Config


_FIELD = re.compile(r"field '([^']+)'")


def _hf(cls: Any, raw: dict[str, Any], where: str) -> Any:
    """transformers' config object of `raw`; its own validation errors become ConfigError naming the field."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return cls.from_dict(dict(raw))
    except StrictDataclassError as exc:
        m = _FIELD.search(str(exc))
        name = f"{where}{m.group(1)}" if m else where.rstrip(".") or "config"
        cause = str(exc).splitlines()[-1].strip()
        raise ConfigError(f"config.json: {name} is invalid ({cause})") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"config.json: {where.rstrip('.') or 'config'} is invalid ({exc})") from None


def _positive(where: str, name: str, value: Any, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{where}{name} must be a {kind} integer, got {value!r}")
    return value


def text_config_of(hf: Any, where: str = "text_config.", tie_word_embeddings: bool | None = None) -> TextConfig:
    """The engine's view of a transformers Mistral4Config, checked. `tie_word_embeddings` is the
    model's tie flag when it is not the text config's own (mistral3: the top-level one)."""
    if hf.model_type != "mistral4":
        raise UnsupportedCheckpointError(f"{where}model_type is {hf.model_type!r}; this engine runs 'mistral4'")
    ints = {name: _positive(where, name, getattr(hf, name)) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts",
        "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
        "moe_intermediate_size", "intermediate_size", "max_position_embeddings")}
    ints.update({name: _positive(where, name, getattr(hf, name), allow_zero=True)
                 for name in ("n_shared_experts", "first_k_dense_replace", "qk_nope_head_dim")})
    if hf.q_lora_rank is not None:
        _positive(where, "q_lora_rank", hf.q_lora_rank)
    if ints["qk_rope_head_dim"] % 2:
        raise ConfigError(f"{where}qk_rope_head_dim must be even (rope rotates pairs), got {ints['qk_rope_head_dim']}")
    experts, groups, topk_group = ints["n_routed_experts"], ints["n_group"], ints["topk_group"]
    top_k = ints["num_experts_per_tok"]
    if experts % groups:
        raise ConfigError(f"{where}n_group ({groups}) must divide n_routed_experts ({experts})")
    if topk_group > groups:
        raise ConfigError(f"{where}topk_group ({topk_group}) exceeds n_group ({groups})")
    if top_k > experts:
        raise ConfigError(f"{where}num_experts_per_tok ({top_k}) exceeds n_routed_experts ({experts})")
    if experts // groups < 2 and groups > 1:
        raise ConfigError(f"{where}n_group ({groups}): each expert group needs at least 2 experts "
                          "(groups score by their top 2)")
    if top_k > topk_group * (experts // groups):
        raise ConfigError(f"{where}num_experts_per_tok ({top_k}) exceeds the experts in topk_group groups")
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise ConfigError(f"{where}num_key_value_heads ({hf.num_key_value_heads}) must equal num_attention_heads "
                          f"({hf.num_attention_heads}) for MLA")
    if hf.hidden_act != "silu":
        raise UnsupportedCheckpointError(f"{where}hidden_act {hf.hidden_act!r} is not supported (silu)")
    if not isinstance(hf.rms_norm_eps, int | float) or not hf.rms_norm_eps > 0:
        raise ConfigError(f"{where}rms_norm_eps must be a positive number, got {hf.rms_norm_eps!r}")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (hf.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"{where}rope_parameters.rope_type {rope_type!r} is not one of transformers' "
                          f"{['default', *ROPE_INIT_FUNCTIONS]}")
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else ((eos,) if eos is not None else ())
    tie = hf.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    return TextConfig(
        vocab_size=ints["vocab_size"], hidden_size=ints["hidden_size"],
        intermediate_size=ints["intermediate_size"], moe_intermediate_size=ints["moe_intermediate_size"],
        num_hidden_layers=ints["num_hidden_layers"], num_attention_heads=ints["num_attention_heads"],
        n_shared_experts=ints["n_shared_experts"], n_routed_experts=experts, num_experts_per_tok=top_k,
        n_group=groups, topk_group=topk_group,
        # transformers tests these two for truth (`if config.norm_topk_prob`): null means false
        norm_topk_prob=bool(hf.norm_topk_prob), routed_scaling_factor=float(hf.routed_scaling_factor),
        first_k_dense_replace=ints["first_k_dense_replace"], q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=ints["kv_lora_rank"], qk_rope_head_dim=ints["qk_rope_head_dim"],
        qk_nope_head_dim=ints["qk_nope_head_dim"], v_head_dim=ints["v_head_dim"],
        rms_norm_eps=float(hf.rms_norm_eps), rope_interleave=bool(hf.rope_interleave),
        max_position_embeddings=ints["max_position_embeddings"], hidden_act=hf.hidden_act,
        attention_bias=bool(hf.attention_bias), tie_word_embeddings=bool(tie),
        bos_token_id=hf.bos_token_id, eos_token_id=eos_ids, raw=hf.to_dict(), hf=hf,
    )


def parse_text_config(raw: dict[str, Any], where: str = "text_config.") -> TextConfig:
    """A text config dict (a mistral3 `text_config`, or a bare mistral4 config.json)."""
    from transformers import Mistral4Config

    if raw.get("model_type", "mistral4") != "mistral4":
        raise UnsupportedCheckpointError(f"{where}model_type is {raw.get('model_type')!r}; this engine runs 'mistral4'")
    return text_config_of(_hf(Mistral4Config, raw, where), where)


def _dtype_name(value: Any) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    quant = parse_quantization(raw)
    model_type = raw.get("model_type")
    if model_type == "mistral3":
        return _mistral3(raw, quant)
    if model_type == "mistral4":
        text = parse_text_config(raw, where="")
        return ModelConfig("mistral4", text, None, None, 1, _dtype_name(text.hf.dtype) or "float32", quant, raw,
                           text.hf)
    raise UnsupportedCheckpointError(
        f"{path}: model_type {model_type!r} is not supported (expected 'mistral3' or 'mistral4')")


def _mistral3(raw: dict[str, Any], quant: Quantization | None) -> ModelConfig:
    from transformers import Mistral3Config, PixtralVisionConfig

    for key in ("text_config", "vision_config"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"config.json: {key} must be an object, got {raw[key]!r}")
    text_raw = raw.get("text_config") or {}
    if text_raw.get("model_type") != "mistral4":
        # transformers' Mistral3Config makes a 'mistral' (dense) text model of a text_config without one
        raise UnsupportedCheckpointError(f"config.json: text_config.model_type is {text_raw.get('model_type')!r} "
                                         "(transformers' Mistral3Config default is 'mistral'); this engine runs "
                                         "'mistral4'")
    text = parse_text_config(text_raw)
    vision_raw = raw.get("vision_config")
    if vision_raw is not None and vision_raw.get("model_type", "pixtral") != "pixtral":
        raise UnsupportedCheckpointError(f"config.json: vision_config.model_type {vision_raw.get('model_type')!r} "
                                         "is not pixtral")
    if vision_raw is not None:
        _hf(PixtralVisionConfig, vision_raw, "vision_config.")
    hf = _hf(Mistral3Config, raw, "")
    vision = hf.vision_config.to_dict()
    for name in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _positive("vision_config.", name, vision.get(name))
    merge = _positive("", "spatial_merge_size", hf.spatial_merge_size)
    image_token = _positive("", "image_token_index", hf.image_token_index, allow_zero=True)
    text = text_config_of(text.hf, tie_word_embeddings=bool(hf.tie_word_embeddings))
    dtype = _dtype_name(hf.dtype) or _dtype_name(text.hf.dtype) or "float32"
    return ModelConfig("mistral3", text, vision, image_token, merge, dtype, quant, raw, hf)
