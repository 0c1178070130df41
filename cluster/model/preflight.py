"""Checks before start: a model directory is checked from config.json, the safetensors headers and
tekken.json alone, before Ray starts or a weight byte is read. The first problem raises a typed
`CheckpointError` (or `ConfigError`) whose one-line message names the file, tensor or field.

`moe-cluster serve`, `moe-cluster generate` and `LLM(...)` run `check_model_dir` first;
`moe-cluster check` prints its report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.errors import CheckpointError, TensorMismatchError, TokenizerMismatchError
from cluster.model.config import ModelConfig, load_model_config
from cluster.model.quantization import dtype_refusal
from cluster.model.safetensors_header import DTYPE_BITS, CheckpointHeaders, TensorHeader, read_checkpoint_headers
from cluster.model.tensor_specs import Quantization, TensorSpec, expected_tensors, quantization_of

TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.", "")
LM_HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
VISION_PREFIXES = ("", "model.")
_VISION_ROOTS = ("vision_tower.", "multi_modal_projector.")
_FLOAT_DTYPES = ("F32", "BF16", "F16")
PARTS = ("dense", "experts", "vision")


@dataclass(frozen=True)
class ModelReport:
    """What the checks found: the model's shape, and its bytes and parameters by part."""

    model_dir: Path
    config: ModelConfig
    dtype: str  # the unquantized tensors' safetensors dtype
    quant: Quantization | None
    expert_layout: str
    tied_lm_head: bool
    bytes_by_part: dict[str, int]
    params_by_part: dict[str, int]
    files: int
    tokenizer_version: str | None

    @property
    def kv_bytes_per_token(self) -> int:
        """The latent cache of one token over every layer, in the unquantized dtype."""
        t = self.config.text
        return t.latent_dim * t.num_hidden_layers * dtype_bytes(self.dtype)


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


def check_model_dir(model_dir: str | Path) -> ModelReport:
    """Every check; raises on the first problem. Reads config.json, headers and tekken.json only."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    config = load_model_config(model_dir)
    quant = quantization_of(config)
    headers = read_checkpoint_headers(model_dir)
    report = check_tensors(config, headers, quant)
    version = check_tokenizer(model_dir, config)
    return replace(report, tokenizer_version=version)


def check_tensors(config: ModelConfig, headers: CheckpointHeaders, quant: Quantization | None) -> ModelReport:
    """Every tensor the engine reads is there with its shape and dtype; nothing it would refuse is."""
    names = headers.names()
    where = headers.index or "the *.safetensors files"
    prefix = next((p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in names), None)
    if prefix is None:
        raise TensorMismatchError(f"{headers.model_dir}: no embed_tokens.weight in {where} under any known "
                                  f"prefix {[p for p in TEXT_PREFIXES if p]}")
    embed = headers.tensors[f"{prefix}embed_tokens.weight"]
    if embed.dtype not in _FLOAT_DTYPES:
        raise TensorMismatchError(f"{_file(headers, embed)}: tensor {embed.name} is {embed.dtype}; the unquantized "
                                  f"tensors must be one of {list(_FLOAT_DTYPES)}")
    lm_head = next((n for n in LM_HEAD_NAMES if n in names), None)
    if lm_head is None and not config.text.tie_word_embeddings:
        raise TensorMismatchError(f"{headers.model_dir}: no lm_head.weight in {where}, and config.json does not "
                                  "tie it to the embeddings (tie_word_embeddings is false)")
    layout = _expert_layout(config, names, prefix, headers.model_dir, where)
    vision_prefix = next((p for p in VISION_PREFIXES if f"{p}vision_tower.patch_conv.weight" in names), "")
    specs = expected_tensors(config, layout, embed.dtype, lm_head=lm_head is not None, quant=quant)

    def full(spec: TensorSpec) -> str:
        if spec.name == "lm_head.weight":
            return lm_head or spec.name
        return (vision_prefix if spec.part == "vision" else prefix) + spec.name

    expected = {full(s): s for s in specs}
    for name, spec in expected.items():
        _compare(headers, where, name, spec, quant)
    vision_roots = tuple(p + r for p in VISION_PREFIXES for r in _VISION_ROOTS)
    for name in sorted(names):
        # what the engine loads: the text model's tensors, and the tower's when it has one
        read = config.vision is not None if name.startswith(vision_roots) else name.startswith(prefix)
        # transformers saves an empty shared_experts MLP when n_shared_experts is 0: nothing to place
        empty = headers.tensors[name].numel == 0
        if read and not empty and name not in expected and name not in LM_HEAD_NAMES:
            raise TensorMismatchError(f"{_file(headers, headers.tensors[name])}: unexpected tensor {name}: "
                                      "config.json has no place for it")
    bytes_by_part = dict.fromkeys(PARTS, 0)
    params_by_part = dict.fromkeys(PARTS, 0)
    for name, spec in expected.items():
        header = headers.tensors[name]
        bytes_by_part[spec.part] += header.nbytes
        if not _is_scale(name):
            params_by_part[spec.part] += header.numel
    return ModelReport(headers.model_dir, config, embed.dtype, quant, layout, lm_head is None, bytes_by_part,
                       params_by_part, len(headers.files), None)


def _is_scale(name: str) -> bool:
    return name.endswith(("_scale_inv", "activation_scale"))


def _file(headers: CheckpointHeaders, header: TensorHeader) -> Path:
    return headers.model_dir / header.file


def _expert_layout(config: ModelConfig, names: set[str], prefix: str, model_dir: Path, where: str) -> str:
    moe = config.text.moe_layers
    if not moe:
        return "fused"
    fused = f"{prefix}layers.{moe[0]}.mlp.experts.gate_up_proj"
    if fused in names:
        return "fused"
    if f"{prefix}layers.{moe[0]}.mlp.experts.0.gate_proj.weight" in names:
        return "per_expert"
    raise TensorMismatchError(f"{model_dir}: missing tensor {fused} in {where} (nor one tensor per expert, "
                              f"{prefix}layers.{moe[0]}.mlp.experts.0.gate_proj.weight)")


def _compare(headers: CheckpointHeaders, where: str, name: str, spec: TensorSpec, quant: Quantization | None) -> None:
    header = headers.tensors.get(name)
    if header is None:
        what = ""
        if _is_scale(name) and quant is not None:
            what = f" (a scale of {quant.describe()}, as config.json's quantization_config says)"
        raise TensorMismatchError(f"{headers.model_dir}: missing tensor {name} in {where}{what}")
    if header.shape != spec.shape:
        raise TensorMismatchError(f"{_file(headers, header)}: tensor {name} has shape {list(header.shape)}, "
                                  f"config.json implies {list(spec.shape)}")
    if header.dtype != spec.dtype:  # unsupported formats refused by name, as the engine's reader does
        raise dtype_refusal(str(_file(headers, header)), name, header.dtype, spec.dtype, spec.part, quant)


def vision_field(config: ModelConfig, field: str, default: Any = None) -> Any:
    vision = config.vision
    return vision.get(field, default) if isinstance(vision, dict) else getattr(vision, field, default)


def check_tokenizer(model_dir: Path, config: ModelConfig) -> str | None:
    """tekken.json is there and, for a model with a vision tower, its image section matches the
    tower (mistral-common sizes and splits images by it). Returns the tokenizer's version."""
    path = next((p for p in (model_dir / "tekken.json", model_dir / "tokenizer.json") if p.is_file()), None)
    if path is None:  # a Tekken-format tokenizer.json is the engine's fallback (tokenizer.py)
        raise TokenizerMismatchError(f"{model_dir}: no tekken.json (the model's Tekken tokenizer)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerMismatchError(f"{path}: not a JSON tokenizer file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("vocab"),
                                                                                                 list):
        raise TokenizerMismatchError(f"{path}: not a Tekken tokenizer (no config and vocab)")
    version = data["config"].get("version")
    if config.vision is None:
        return version
    image = data.get("image")
    if not isinstance(image, dict):
        raise TokenizerMismatchError(f"{path}: no image section, but config.json has a vision tower")
    for key, want, field in (("image_patch_size", vision_field(config, "patch_size"), "vision_config.patch_size"),
                             ("spatial_merge_size", config.spatial_merge_size, "spatial_merge_size"),
                             ("max_image_size", vision_field(config, "image_size"), "vision_config.image_size")):
        if image.get(key) != want:
            raise TokenizerMismatchError(f"{path}: image.{key} is {image.get(key)!r}, but config.json's {field} "
                                         f"is {want!r}")
    return version
