"""FP8 checkpoints made by the tests' own code (not cluster.testing's writer), and their fp32
references: the tests' own dequantization of the same fp8 values, saved as a plain fp32 checkpoint
that transformers loads (never `from_pretrained` on the FP8 files: on CPUs transformers
dequantizes those to bf16 and refuses some partial edge blocks).

The text model's sizes are chosen so that with [32, 64] blocks every scale grid has at least 3
blocks on each axis and partial edge blocks, and so that the fused gate_up grid (read over the
fused [2I, H] matrix) differs from stacking a gate grid and an up grid (I % 32 != 0).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cluster.model.tokenizer import write_tekken_v15
from cluster.testing.presets import PRESETS, yarn

E4M3_MAX = 448.0
H, HEADS, Q_LORA, KV_LORA, ROPE, NOPE, V, EXPERTS, TOP_K, I_MOE, I_DENSE = 144, 2, 144, 136, 16, 20, 72, 8, 2, 136, 200
TEXT = {
    "model_type": "mistral4", "vocab_size": 131072, "hidden_size": H, "num_hidden_layers": 3,
    "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA,
    "qk_rope_head_dim": ROPE, "qk_nope_head_dim": NOPE, "v_head_dim": V, "n_routed_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "n_shared_experts": 1, "moe_intermediate_size": I_MOE,
    "intermediate_size": I_DENSE, "first_k_dense_replace": 1, "max_position_embeddings": 4096,
    "rope_parameters": yarn(512, 8.0, ROPE, ROPE + NOPE), "initializer_range": 0.08,
}
# The vision tower, projector and lm_head stay unquantized, as in the published checkpoint; one
# text module more shows that modules_to_not_convert is honoured.
SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head",
        "model.language_model.layers.0.self_attn.o_proj"]
SKIPPED_TENSOR = "language_model.model.layers.0.self_attn.o_proj.weight"
_PREFIX = "language_model.model."
# nn.Linear layers of the text model (transformers converts those; the MoE gate is no Linear)
_LINEAR = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn|mlp|mlp\.shared_experts)\."
                     r"\w+_proj(_with_mqa)?\.weight$")
_FUSED = re.compile(r"^(language_model\.model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3fn [N, K], scales): block by block, each block's amax mapped to 448; per-tensor
    when `block` is None (a 0-dim scale)."""
    if block is None:
        scale = w.abs().max() / E4M3_MAX
        return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
    rows, cols = w.shape
    grid = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            grid[i, j] = w[r, c].abs().max() / E4M3_MAX
            q[r, c] = (w[r, c] / grid[i, j]).to(torch.float8_e4m3fn)
    return q, grid


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """The fp32 weight: every fp8 value times the scale of the block it sits in."""
    w = q.float()
    if block is None:
        return w * scale.float()
    out = torch.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[r, c] = w[r, c] * scale[i, j]
    return out


def _skipped(name: str) -> bool:
    module = "model.language_model." + name[len(_PREFIX):].removesuffix(".weight")
    return any(module == s or module.startswith(s + ".") for s in SKIP)


def make_fp8_pair(root: Path, name: str, form: str, layout: str, block: tuple[int, int] | None,
                  seed: int = 0) -> tuple[Path, Path]:
    """(fp8 checkpoint, fp32 reference checkpoint of its dequantized weights)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    fp8_dir, ref_dir = root / f"{name}-fp8", root / f"{name}-ref"
    if fp8_dir.exists():
        return fp8_dir, ref_dir
    torch.manual_seed(seed)
    tiny = PRESETS["tiny"]
    config = Mistral3Config(text_config=Mistral4Config(**TEXT), vision_config=PixtralVisionConfig(**tiny.vision))
    model = Mistral3ForConditionalGeneration(config).eval()  # default config: lm_head tied to the embeddings
    model.save_pretrained(ref_dir)
    write_tekken_v15(ref_dir / "tekken.json", tiny.vision["patch_size"], config.spatial_merge_size,
                     tiny.max_image_size)
    saved = load_file(ref_dir / "model.safetensors")
    fp8: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    static = form == "static"
    for tensor_name, t in saved.items():
        fused = _FUSED.match(tensor_name)
        if fused:
            q, deq, scales = _experts(tensor_name, t, block, layout, static)
            fp8.update(q)
            fp8.update(scales)
            ref[tensor_name] = deq
        elif _LINEAR.match(tensor_name) and not _skipped(tensor_name):
            q, s = quantize_blocks(t, block)
            base = tensor_name.removesuffix(".weight")
            fp8.update({tensor_name: q, f"{base}.weight_scale_inv": s})
            if static:
                fp8[f"{base}.activation_scale"] = torch.tensor(0.05)
            ref[tensor_name] = dequantize_blocks(q, s, block)
        else:
            fp8[tensor_name] = ref[tensor_name] = t
    save_file(ref, ref_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(ref_dir, fp8_dir)
    save_file(fp8, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                                  "weight_block_size": list(block) if block else None, "modules_to_not_convert": SKIP}
    (fp8_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return fp8_dir, ref_dir


def _experts(name: str, t: torch.Tensor, block: tuple[int, int] | None, layout: str,
             static: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Quantized tensors, the dequantized fused tensor and the scales of one fused expert tensor."""
    match = _FUSED.match(name)
    assert match is not None
    base, proj = match.groups()
    gate_up = proj == "gate_up_proj"
    q_out: dict[str, torch.Tensor] = {}
    s_out: dict[str, torch.Tensor] = {}
    deq = torch.empty_like(t)
    if layout == "fused":
        qs, ss = [], []
        for e in range(t.shape[0]):
            if block is None and gate_up:  # per-tensor: transformers keeps one scale per half: [2, 1]
                halves = [quantize_blocks(h, None) for h in t[e].chunk(2)]
                q, s = torch.cat([h[0] for h in halves]), torch.stack([h[1] for h in halves])[:, None]
                deq[e] = torch.cat([dequantize_blocks(hq, hs, None) for hq, hs in halves])
            else:
                q, s = quantize_blocks(t[e], block)
                s = s.reshape(1, 1) if block is None else s
                deq[e] = dequantize_blocks(q, s, block)
            qs.append(q)
            ss.append(s)
        q_out[name] = torch.stack(qs)
        s_out[f"{name}_scale_inv"] = torch.stack(ss)
        if static:
            s_out[f"{name}_activation_scale"] = torch.full((t.shape[0],), 0.05)
        return q_out, deq, s_out
    projections = {"gate_proj": slice(0, I_MOE), "up_proj": slice(I_MOE, 2 * I_MOE)} if gate_up else {
        "down_proj": slice(None)}
    for e in range(t.shape[0]):
        for p, rows in projections.items():
            q, s = quantize_blocks(t[e, rows], block)
            q_out[f"{base}.{e}.{p}.weight"] = q
            s_out[f"{base}.{e}.{p}.weight_scale_inv"] = s
            if static:
                s_out[f"{base}.{e}.{p}.activation_scale"] = torch.tensor(0.05)
            deq[e, rows] = dequantize_blocks(q, s, block)
    return q_out, deq, s_out
