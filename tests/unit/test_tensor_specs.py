"""The tensors the checks before start expect are those the modules that load them hold: the
engine's text model (dense part), transformers' Mistral 3 model (everything, fused experts), and
transformers' FP8 quantizer (e4m3 weights and their scales); per-expert names are those the
checkpoint writer's per-expert split saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.model.config import load_model_config
from cluster.model.preflight import check_model_dir
from cluster.model.quantization import Quantization
from cluster.model.safetensors_header import read_checkpoint_headers
from cluster.model.tensor_specs import expected_tensors
from cluster.testing.presets import PRESETS

ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
VARIANTS = {
    "tiny": ({}, {}),
    "no_q_lora_first_dense_bias": ({"q_lora_rank": None, "first_k_dense_replace": 1, "attention_bias": True,
                                    "n_shared_experts": 2}, {"multimodal_projector_bias": True,
                                                             "vision_feature_layer": [-1, -2]}),
}


def config_dir(tmp_path: Path, text: dict, top: dict) -> Path:
    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    p = PRESETS["tiny"]
    config = Mistral3Config(text_config=Mistral4Config(**{**p.text, **text}),
                            vision_config=PixtralVisionConfig(**p.vision), tie_word_embeddings=False, **top)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return tmp_path


def transformers_tensors(model_dir: Path, quant: dict | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Relative name -> (shape, dtype) of transformers' own model on the meta device."""
    from transformers import FineGrainedFP8Config, Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(Mistral3Config.from_dict(json.loads((model_dir / "config.json")
                                                                                     .read_text())))
    if quant is not None:
        model = replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"], pre_quantized=True,
                                        quantization_config=FineGrainedFP8Config(**quant))
    out = {}
    for name, t in model.state_dict().items():
        rel = name.removeprefix("model.language_model.").removeprefix("model.")
        out[rel] = (tuple(t.shape), ST[t.dtype])
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_specs_are_transformers_and_the_engines_tensors(variant, tmp_path):
    from cluster.model.text_model import Mistral4TextModel

    model_dir = config_dir(tmp_path, *VARIANTS[variant])
    config = load_model_config(model_dir)
    specs = {s.name: (s.shape, s.dtype) for s in expected_tensors(config, "fused", "F32")}
    assert specs == transformers_tensors(model_dir)
    with torch.device("meta"):
        engine = Mistral4TextModel(config.text)
    dense = {n: (tuple(t.shape), "F32") for n, t in engine.state_dict().items()}
    assert {n: v for n, v in specs.items() if not n.startswith(("vision_tower.", "multi_modal_projector."))
            and ".mlp.experts." not in n} == dense


@pytest.mark.parametrize("block, scheme", [([32, 64], "dynamic"), ([128, 128], "dynamic"), (None, "static")])
def test_fp8_specs_are_transformers_fp8_modules(block, scheme, tmp_path):
    model_dir = config_dir(tmp_path, {}, {})
    config = load_model_config(model_dir)
    quant = Quantization(tuple(block) if block else None, scheme, ("lm_head",))
    specs = {s.name: (s.shape, s.dtype) for s in expected_tensors(config, "fused", "F32", quant=quant)}
    assert specs == transformers_tensors(model_dir, {"weight_block_size": block, "activation_scheme": scheme})
    # kv_a_proj_with_mqa: 48 rows in blocks of 32 -> a partial second block row
    if block == [32, 64]:
        assert specs["layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ((2, 1), "F32")


def test_per_expert_specs_are_the_writers_names(make_ckpt):
    model = make_ckpt("tiny_per_expert_specs", preset="tiny", expert_layout="per_expert")
    config = load_model_config(model)
    specs = {"language_model.model." + s.name if not s.name.startswith(("vision_tower.", "multi_modal_projector.",
                                                                        "lm_head."))
             else ("language_model." + s.name if s.name.startswith("lm_head.") else s.name): (s.shape, s.dtype)
             for s in expected_tensors(config, "per_expert", "F32")}
    headers = read_checkpoint_headers(model).tensors
    assert specs == {n: (h.shape, h.dtype) for n, h in headers.items()}
    assert check_model_dir(model).expert_layout == "per_expert"
