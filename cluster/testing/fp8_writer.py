"""Rewrites a saved checkpoint's weights in transformers' FP8 format (`quant_method: "fp8"`), as
published FP8 checkpoints hold them: e4m3fn weights with float32 `weight_scale_inv` (a block grid,
or one scale per tensor with static activation scales), the vision tower, projector and lm_head
left unquantized by `modules_to_not_convert`. Which tensors are converted, and their scale
shapes, come from `tensor_specs.expected_tensors` (transformers' rules)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cluster.errors import ConfigError
from cluster.model.config import load_model_config
from cluster.model.quantization import FP8_DTYPE, parse_quantization
from cluster.model.safetensors_header import INDEX_FILE
from cluster.model.tensor_specs import expected_tensors

FP8_FORMS = ("block", "static")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# As the published Mistral Small 4: the vision tower, its projector and lm_head stay in full precision.
DEFAULT_SKIP = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
_TEXT_PREFIX = "language_model.model."  # transformers' save_pretrained names for mistral3


def quantization_config(form: str, block: tuple[int, int] = (128, 128),
                        skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, Any]:
    if form not in FP8_FORMS:
        raise ConfigError(f"fp8 form must be one of {FP8_FORMS}, got {form!r}")
    return {"quant_method": "fp8", "activation_scheme": "dynamic" if form == "block" else "static",
            "weight_block_size": list(block) if form == "block" else None, "modules_to_not_convert": list(skip)}


def quantize(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] -> (e4m3fn [..., N, K], scale_inv): per block [..., ceil(N/b0), ceil(K/b1)]
    (amax / 448 over each block, partial edge blocks included), or one scalar per [N, K] matrix."""
    w = weight.float()
    rows, cols = w.shape[-2:]
    if block is None:
        scale = (w.abs().amax(dim=(-2, -1)) / FP8_MAX).clamp(min=1e-12)  # [...]
        return (w / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = w.new_zeros(*w.shape[:-2], grid[0] * block[0], grid[1] * block[1])
    padded[..., :rows, :cols] = w
    tiles = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))  # [..., R, b0, C, b1]
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)  # [..., R, C]
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).flatten(-4, -3).flatten(-2, -1)
    return q[..., :rows, :cols].to(torch.float8_e4m3fn), scale


def write_fp8(directory: str | Path, form: str, block: tuple[int, int] = (128, 128),
              skip: tuple[str, ...] = DEFAULT_SKIP) -> None:
    """Converts the checkpoint in `directory` (as make_checkpoint saved it) to FP8 in place."""
    directory = Path(directory)
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text())
    raw["quantization_config"] = quantization_config(form, block, skip)
    config = replace(load_model_config(directory), quantization=parse_quantization(raw))
    layout = "per_expert" if _has_per_expert(directory) else "fused"
    specs = {_TEXT_PREFIX + s.name if s.part != "vision" else s.name: s
             for s in expected_tensors(config, layout, "F32", lm_head=False, quant=config.quantization)}
    index_path = directory / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for file in sorted(directory.glob("*.safetensors")):
        out: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(file).items():
            spec = specs.get(name)
            if spec is None or spec.dtype != FP8_DTYPE:
                out[name] = tensor
                continue
            out.update(_converted(name, tensor, config.quantization.block if config.quantization else None,
                                  form == "static"))
        for name, tensor in out.items():
            want = specs.get(name)
            if want is not None and tuple(tensor.shape) != want.shape:
                raise ConfigError(f"fp8 writer: {name} came out {list(tensor.shape)}, expected {list(want.shape)}")
        save_file(out, file, metadata={"format": "pt"})
        if index is not None:
            index["weight_map"].update({n: file.name for n in out})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True))


def _converted(name: str, tensor: torch.Tensor, block: tuple[int, int] | None,
               static: bool) -> dict[str, torch.Tensor]:
    if name.endswith(".weight"):  # a linear layer, or one expert's projection
        q, scale = quantize(tensor, block)
        base = name.removesuffix(".weight")
        out = {name: q, f"{base}.weight_scale_inv": scale}
        if static:
            out[f"{base}.activation_scale"] = torch.tensor(1.0)
        return out
    # fused experts [E, N, K]: one grid per expert over the whole fused matrix
    if block is not None:
        q, scale = quantize(tensor, block)
        if name.endswith("gate_up_proj") and scale.shape[1] < 2:  # transformers keeps a row for each half
            scale = torch.cat([scale, torch.ones_like(scale)], dim=1)
    elif name.endswith("gate_up_proj"):  # per-tensor: one scale for the gate half, one for the up half
        halves = tensor.chunk(2, dim=1)
        parts = [quantize(h, None) for h in halves]
        q = torch.cat([p[0] for p in parts], dim=1)
        scale = torch.stack([p[1] for p in parts], dim=1)[..., None]  # [E, 2, 1]
    else:
        q, scale = quantize(tensor, None)
        scale = scale[:, None, None]  # [E, 1, 1]
    out = {name: q, f"{name}_scale_inv": scale}
    if static:
        out[f"{name}_activation_scale"] = torch.ones(tensor.shape[0])
    return out


def _has_per_expert(directory: Path) -> bool:
    index_path = directory / INDEX_FILE
    if index_path.exists():
        names = json.loads(index_path.read_text())["weight_map"]
    else:
        names = set()
        for f in directory.glob("*.safetensors"):
            with safe_open(f, "pt") as handle:
                names.update(handle.keys())
    return any(".mlp.experts.0.gate_proj.weight" in n for n in names)
