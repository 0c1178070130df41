"""config.json read through transformers' config classes: defaults, the tie rule, and refusals
that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.errors import ConfigError, UnsupportedCheckpointError
from cluster.model.config import load_model_config, parse_text_config
from cluster.testing.presets import PRESETS

ENGINE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok", "n_group",
                 "topk_group", "routed_scaling_factor", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank",
                 "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rms_norm_eps", "max_position_embeddings",
                 "hidden_act", "attention_bias", "bos_token_id", "norm_topk_prob", "rope_interleave")


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _mistral3(**top: Any) -> dict[str, Any]:
    tiny = PRESETS["tiny"]
    return {"model_type": "mistral3", "text_config": dict(tiny.text),
            "vision_config": {"model_type": "pixtral", **tiny.vision}, **top}


def test_bare_mistral4_carries_transformers_defaults(tmp_path: Path) -> None:
    from transformers import Mistral4Config

    config = load_model_config(_write(tmp_path, {"model_type": "mistral4"}))
    text, reference = config.text, Mistral4Config()
    for name in ENGINE_FIELDS:
        assert getattr(text, name) == getattr(reference, name), name
    assert text.eos_token_id == (reference.eos_token_id,)
    assert text.tie_word_embeddings is False and config.vision is None and config.quantization is None
    # ... which are the published Mistral Small 4's
    assert (text.hidden_size, text.num_hidden_layers, text.n_routed_experts, text.moe_intermediate_size) == (
        4096, 36, 128, 2048)
    assert (text.kv_lora_rank, text.qk_rope_head_dim, text.vocab_size, text.max_position_embeddings) == (
        256, 64, 131072, 1_048_576)
    assert text.hf_config().rope_parameters["factor"] == 128.0


@pytest.mark.parametrize("top, tied", [({}, True), ({"tie_word_embeddings": True}, True),
                                       ({"tie_word_embeddings": False}, False)])
def test_mistral3_ties_lm_head_by_the_top_level_flag(tmp_path: Path, top: dict[str, Any], tied: bool) -> None:
    cfg = _mistral3(**top)
    assert cfg["text_config"]["tie_word_embeddings"] is False  # the text config's own flag does not decide
    config = load_model_config(_write(tmp_path, cfg))
    assert config.text.tie_word_embeddings is tied


def test_mistral3_takes_transformers_defaults_for_what_it_omits(tmp_path: Path) -> None:
    cfg = _mistral3()
    del cfg["vision_config"]
    config = load_model_config(_write(tmp_path, cfg))
    # transformers' Mistral3Config defaults: a Pixtral tower of patch 14, merge 2, [IMG] id 10
    assert config.vision is not None and config.vision["patch_size"] == 14
    assert (config.spatial_merge_size, config.image_token_id) == (2, 10)


def test_mistral3_without_a_mistral4_text_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedCheckpointError, match="text_config.model_type.*'mistral'"):
        load_model_config(_write(tmp_path, {"model_type": "mistral3"}))


@pytest.mark.parametrize("change, field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 2}, "topk_group"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"n_group": None}, "n_group"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1.0}}, "rope_type"),
])
def test_invalid_text_config_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_text_config({**PRESETS["tiny"].text, **change})


@pytest.mark.parametrize("change, field", [
    ({"spatial_merge_size": 0}, "spatial_merge_size"),
    ({"vision_config": {"model_type": "pixtral", "patch_size": "16"}}, "vision_config.patch_size"),
    ({"vision_config": {"model_type": "pixtral", "patch_size": 0}}, "vision_config.patch_size"),
    ({"text_config": [1]}, "text_config"),
])
def test_invalid_top_level_config_names_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_model_config(_write(tmp_path, {**_mistral3(), **change}))
