"""What a checkpoint must hold for this engine: every tensor it reads, with the shape and dtype that
config.json implies, scales included. `expected_tensors` is the one place that knows it; the
checks before start (preflight.py) and the memory plan (footprint.py) read it.

Names are relative: text tensors under the checkpoint's text prefix (`layers.0.mlp.gate.weight`,
`lm_head.weight`), vision tensors under its vision prefix (`vision_tower.patch_conv.weight`).
The shapes are those of the engine's modules (text_model.py, attention.py, moe.py) and of
transformers' Pixtral tower and Mistral 3 projector, which the vision encoder loads strictly;
tests/unit/test_tensor_specs.py checks them against both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cluster.model.config import ModelConfig
from cluster.model.quantization import FP8_DTYPE, Quantization

SCALE_DTYPE = "F32"
EXPERT_LAYOUTS = ("fused", "per_expert")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype
    part: str  # "dense" | "experts" | "vision"
    layer: int | None = None


def quantization_of(config: ModelConfig) -> Quantization | None:
    """The checkpoint's quantization (parsed, and refused where unsupported, by config.py)."""
    return config.quantization


def expected_tensors(config: ModelConfig, expert_layout: str, dtype: str, lm_head: bool = True,
                     quant: Quantization | None = None) -> list[TensorSpec]:
    """Every tensor the engine reads. `dtype` is the checkpoint's unquantized dtype; with `quant`,
    the linear layers it converts are e4m3 with their scales."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    out: list[TensorSpec] = []
    for name, shape, part, layer, linear in _weights(config, expert_layout, lm_head):
        module = name.rsplit(".", 1)[0] if name.endswith(".weight") else name
        if quant is None or not linear or not _converted(config, part, module, quant):
            out.append(TensorSpec(name, shape, dtype, part, layer))
        else:
            out.extend(_fp8(name, shape, part, layer, quant))
    return out


def _weights(config: ModelConfig, layout: str, lm_head: bool) -> Iterator[tuple[str, tuple[int, ...], str, int | None,
                                                                               bool]]:
    """(name, shape, part, layer, is a linear weight) of the unquantized model."""
    t = config.text
    h = t.hidden_size
    yield "embed_tokens.weight", (t.vocab_size, h), "dense", None, False
    for i in range(t.num_hidden_layers):
        p = f"layers.{i}."
        for name, shape, linear in _layer(config, i):
            yield p + name, shape, "dense", i, linear
        if t.is_moe_layer(i):
            e, inter = t.n_routed_experts, t.moe_intermediate_size
            if layout == "fused":
                yield p + "mlp.experts.gate_up_proj", (e, 2 * inter, h), "experts", i, True
                yield p + "mlp.experts.down_proj", (e, h, inter), "experts", i, True
            else:
                for x in range(e):
                    for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)),
                                        ("down_proj", (h, inter))):
                        yield f"{p}mlp.experts.{x}.{proj}.weight", shape, "experts", i, True
    yield "norm.weight", (h,), "dense", None, False
    if lm_head:
        yield "lm_head.weight", (t.vocab_size, h), "dense", None, True
    if config.vision is not None:
        for name, shape, linear in _vision(config):
            yield name, shape, "vision", None, linear


def _layer(config: ModelConfig, i: int) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    t = config.text
    h, heads = t.hidden_size, t.num_attention_heads
    yield "input_layernorm.weight", (h,), False
    yield "post_attention_layernorm.weight", (h,), False
    a = "self_attn."
    if t.q_lora_rank is None:
        yield a + "q_proj.weight", (heads * t.qk_head_dim, h), True
    else:
        yield a + "q_a_proj.weight", (t.q_lora_rank, h), True
        if t.attention_bias:
            yield a + "q_a_proj.bias", (t.q_lora_rank,), False
        yield a + "q_a_layernorm.weight", (t.q_lora_rank,), False
        yield a + "q_b_proj.weight", (heads * t.qk_head_dim, t.q_lora_rank), True
    yield a + "kv_a_proj_with_mqa.weight", (t.latent_dim, h), True
    if t.attention_bias:
        yield a + "kv_a_proj_with_mqa.bias", (t.latent_dim,), False
    yield a + "kv_a_layernorm.weight", (t.kv_lora_rank,), False
    yield a + "kv_b_proj.weight", (heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank), True
    yield a + "o_proj.weight", (h, heads * t.v_head_dim), True
    if t.attention_bias:
        yield a + "o_proj.bias", (h,), False
    if t.is_moe_layer(i):
        yield "mlp.gate.weight", (t.n_routed_experts, h), False
        shared = t.moe_intermediate_size * t.n_shared_experts
        mlp = "mlp.shared_experts." if shared else None
    else:
        shared, mlp = t.intermediate_size, "mlp."
    if mlp:
        yield mlp + "gate_proj.weight", (shared, h), True
        yield mlp + "up_proj.weight", (shared, h), True
        yield mlp + "down_proj.weight", (h, shared), True


def _vision(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    v: dict[str, Any] = config.vision or {}
    hv, iv, ch, patch = v["hidden_size"], v["intermediate_size"], v.get("num_channels", 3), v["patch_size"]
    merge = config.spatial_merge_size
    yield "vision_tower.patch_conv.weight", (hv, ch, patch, patch), False
    yield "vision_tower.ln_pre.weight", (hv,), False
    for j in range(v["num_hidden_layers"]):
        p = f"vision_tower.transformer.layers.{j}."
        yield p + "attention_norm.weight", (hv,), False
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}attention.{proj}.weight", (hv, hv), True
        yield p + "ffn_norm.weight", (hv,), False
        yield p + "feed_forward.gate_proj.weight", (iv, hv), True
        yield p + "feed_forward.up_proj.weight", (iv, hv), True
        yield p + "feed_forward.down_proj.weight", (hv, iv), True
    layers = config.raw.get("vision_feature_layer", -1)
    features = len(layers) if isinstance(layers, list) else 1
    bias = bool(config.raw.get("multimodal_projector_bias", False))
    h = config.text.hidden_size
    m = "multi_modal_projector."
    yield m + "norm.weight", (hv,), False
    yield m + "patch_merger.merging_layer.weight", (hv, hv * merge * merge), True
    yield m + "linear_1.weight", (h, hv * features), True
    if bias:
        yield m + "linear_1.bias", (h,), False
    yield m + "linear_2.weight", (h, h), True
    if bias:
        yield m + "linear_2.bias", (h,), False


def _converted(config: ModelConfig, part: str, module: str, quant: Quantization) -> bool:
    """Whether transformers' FP8 quantizer converts `module` (matched on transformers' own module
    names, as its `modules_to_not_convert` is; None means its default: everything but lm_head)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    if ".mlp.experts." in module or module.endswith(".mlp.experts"):
        module = module.split(".mlp.experts")[0] + ".mlp.experts"  # one FP8Experts module per layer
    if module == "lm_head":
        full = "lm_head"
    elif part == "vision":
        full = f"model.{module}"
    else:
        full = f"model.language_model.{module}" if config.model_type == "mistral3" else f"model.{module}"
    skip = list(quant.modules_to_not_convert) if quant.modules_to_not_convert is not None else ["lm_head"]
    return should_convert_module(full, skip)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8(name: str, shape: tuple[int, ...], part: str, layer: int | None,
         quant: Quantization) -> Iterator[TensorSpec]:
    """An e4m3 weight and its scales, named and shaped as transformers' FP8Linear / FP8Experts hold them."""
    yield TensorSpec(name, shape, FP8_DTYPE, part, layer)
    static = quant.activation_scheme == "static"
    if name.endswith(".weight"):  # a linear layer (also one expert's projection)
        base = name[: -len(".weight")]
        grid = (_cdiv(shape[0], quant.block[0]), _cdiv(shape[1], quant.block[1])) if quant.block else ()
        yield TensorSpec(f"{base}.weight_scale_inv", grid, SCALE_DTYPE, part, layer)
        if static:
            yield TensorSpec(f"{base}.activation_scale", (), SCALE_DTYPE, part, layer)
        return
    experts, rows, cols = shape  # fused experts: one grid per expert, over the fused matrix
    min_rows = 2 if name.endswith("gate_up_proj") else 1  # transformers keeps a row for each half
    grid = (max(_cdiv(rows, quant.block[0]), min_rows), _cdiv(cols, quant.block[1])) if quant.block \
        else (min_rows, 1)
    yield TensorSpec(f"{name}_scale_inv", (experts, *grid), SCALE_DTYPE, part, layer)
    if static:
        yield TensorSpec(f"{name}_activation_scale", (experts,), SCALE_DTYPE, part, layer)
