"""A model's memory footprint by part, in the checkpoint's own dtypes: from the safetensors headers
(a checked model directory) or from config.json alone (a model not downloaded yet)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError
from cluster.model.config import ModelConfig, load_model_config
from cluster.model.preflight import ModelReport, dtype_bytes
from cluster.model.safetensors_header import DTYPE_BITS, TORCH_DTYPES
from cluster.model.tensor_specs import Quantization, expected_tensors, quantization_of


@dataclass(frozen=True)
class ModelFootprint:
    config: ModelConfig
    dtype: str  # the unquantized tensors' dtype, also the engine's compute and KV dtype
    quant: Quantization | None
    dense_bytes: int  # everything an engine holds: embeddings, attention, norms, gates, shared experts, lm_head
    expert_bytes: int  # every routed expert of every MoE layer, scales included
    vision_bytes: int  # the Pixtral tower and the projector
    source: str  # "headers" or "config.json"

    @property
    def num_experts(self) -> int:
        return self.config.text.n_routed_experts

    @property
    def moe_layers(self) -> int:
        return len(self.config.text.moe_layers)

    @property
    def bytes_per_expert(self) -> int:
        """One routed expert of one layer (gate, up and down projections, with their scales)."""
        return self.expert_bytes // max(self.num_experts * self.moe_layers, 1)

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.vision_bytes

    @property
    def act_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """The MLA latent of one token over every layer: (kv_lora_rank + qk_rope_head_dim) x layers x bytes."""
        t = self.config.text
        return (t.kv_lora_rank + t.qk_rope_head_dim) * t.num_hidden_layers * self.act_bytes

    def describe_dtype(self) -> str:
        return self.dtype + (f", {self.quant.describe()}" if self.quant else "")


def footprint_of_report(report: ModelReport) -> ModelFootprint:
    b = report.bytes_by_part
    return ModelFootprint(report.config, report.dtype, report.quant, b["dense"], b["experts"], b["vision"], "headers")


def footprint_of_config(model_dir: str | Path, dtype: str | None = None) -> ModelFootprint:
    """From config.json alone: the tensors `expected_tensors` lists (fused experts, lm_head unless
    tied), in `dtype` (a torch name) or config.json's `dtype` / `torch_dtype`."""
    config = load_model_config(model_dir)
    name = dtype or _config_dtype(config)
    if name is None:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: names no dtype (nor torch_dtype); give --dtype")
    st = TORCH_DTYPES.get(name, name.upper())
    if st not in ("F32", "BF16", "F16"):
        raise ConfigError(f"dtype {name!r} is not an unquantized float dtype (float32, bfloat16, float16)")
    quant = quantization_of(config)
    specs = expected_tensors(config, "fused", st, lm_head=not config.text.tie_word_embeddings, quant=quant)
    by_part = {"dense": 0, "experts": 0, "vision": 0}
    for s in specs:
        by_part[s.part] += math.prod(s.shape) * DTYPE_BITS[s.dtype] // 8
    return ModelFootprint(config, st, quant, by_part["dense"], by_part["experts"], by_part["vision"], "config.json")


def _config_dtype(config: ModelConfig) -> str | None:
    text = config.raw.get("text_config") or {}
    for source in (config.raw, text):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str):
                return source[key]
    return None


def fmt_bytes(n: float) -> str:
    """GiB from 1 GiB up, else MiB or KiB (binary units throughout)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 2**10:,.2f} KiB"
