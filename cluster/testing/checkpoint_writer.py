"""Writes random checkpoints of the full Mistral3 (Pixtral + Mistral4) architecture in Hugging
Face format, with a real Tekken v15 tokenizer; optionally with scripted output."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cluster.errors import ConfigError, ScriptError
from cluster.model.tokenizer import write_tekken_v15
from cluster.testing.fp8_writer import FP8_FORMS, write_fp8
from cluster.testing.presets import get_preset

IMG_TOKEN_ID = 10  # Tekken's [IMG]
EOS_TOKEN_ID = 2
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
METADATA_FILE = "moe_cluster.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, script: Sequence[int] | None = None,
                    expert_layout: str = "fused", num_files: int = 1,
                    text_overrides: dict[str, Any] | None = None, dtype: str = "float32",
                    fp8: str | None = None, fp8_block: tuple[int, int] = (128, 128)) -> Path:
    """Builds the model with `transformers`, randomly initialised from `seed`, and saves it in
    `dtype` ("float32" or "bfloat16"); with `fp8` ("block": `fp8_block` grids, or "static":
    per-tensor scales), its linear layers are then rewritten in FP8 (fp8_writer.py)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    if expert_layout not in ("fused", "per_expert"):
        raise ConfigError(f"expert_layout must be 'fused' or 'per_expert', got {expert_layout!r}")
    if num_files < 1:
        raise ConfigError(f"num_files must be >= 1, got {num_files}")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if fp8 is not None and fp8 not in FP8_FORMS:
        raise ConfigError(f"fp8 must be one of {FP8_FORMS}, got {fp8!r}")
    spec = get_preset(preset)
    text = {**spec.text, **(text_overrides or {})}
    out = Path(out)
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config=Mistral4Config(**text), vision_config=PixtralVisionConfig(**spec.vision),
        image_token_index=IMG_TOKEN_ID, spatial_merge_size=spec.spatial_merge_size, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(config).eval()
    if script is not None:
        _apply_script(model, list(script), seed)
    model = model.to(_DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp, max_shard_size=max(size // num_files + 1, 1 << 20))
        if expert_layout == "per_expert":
            _split_experts(Path(tmp), text["moe_intermediate_size"])
        if fp8 is not None:
            write_fp8(tmp, fp8, fp8_block)
        for f in Path(tmp).iterdir():
            shutil.move(str(f), out / f.name)
    write_tekken_v15(out / "tekken.json", spec.vision["patch_size"], spec.spatial_merge_size, spec.max_image_size)
    meta = {"preset": preset, "seed": seed, "script": list(script) if script is not None else None,
            "expert_layout": expert_layout, "text_overrides": text_overrides or {}, "dtype": dtype,
            "fp8": fp8, "fp8_block": list(fp8_block) if fp8 == "block" else None}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _split_experts(directory: Path, intermediate: int) -> None:
    """Rewrites fused expert tensors as one tensor per expert, as published MoE checkpoints are."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(file)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            m = _FUSED.match(name)
            if not m:
                out[name] = t
                continue
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    out[f"{m.group(1)}.{e}.gate_proj.weight"] = t[e, :intermediate].clone()
                    out[f"{m.group(1)}.{e}.up_proj.weight"] = t[e, intermediate:].clone()
                else:
                    out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e].clone()
        save_file(out, file, metadata={"format": "pt"})
        if index is not None:
            for name in tensors:
                index["weight_map"].pop(name, None) if _FUSED.match(name) else None
            index["weight_map"].update({n: file.name for n in out})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def script_successors(script: list[int], vocab: int) -> dict[int, int]:
    """The bigram automaton that emits `script` then EOS: token -> next token."""
    if not script:
        raise ScriptError("script is empty: give at least one token id")
    succ: dict[int, int] = {}
    for i, tok in enumerate(script):
        if not 0 <= tok < vocab:
            raise ScriptError(f"script token {i} is {tok}, outside the vocabulary [0, {vocab})")
        if tok == EOS_TOKEN_ID:
            raise ScriptError(f"script token {i} is end-of-sequence ({EOS_TOKEN_ID}); it is appended for you")
        nxt = script[i + 1] if i + 1 < len(script) else EOS_TOKEN_ID
        if succ.setdefault(tok, nxt) != nxt:
            raise ScriptError(
                f"script token {i} ({tok}) is followed by {nxt} here but by {succ[tok]} earlier: a scripted "
                "checkpoint picks the next token from the current one, so each token needs one successor")
    return succ


def _apply_script(model: Any, script: list[int], seed: int) -> None:
    """Weights that make greedy decoding emit `script` then EOS after any prompt: every layer's
    residual contribution is scaled to near zero, so the last hidden state is the current token's
    embedding; embeddings point at their successor's lm_head row."""
    lm = model.model.language_model
    h = lm.embed_tokens.weight.shape[1]
    vocab = lm.embed_tokens.weight.shape[0]
    succ = script_successors(script, vocab)
    targets = sorted(set(succ.values()) | {script[0]})
    gen = torch.Generator().manual_seed(seed)
    if len(targets) <= h:
        dirs = torch.eye(h)[: len(targets)]
    else:
        dirs = torch.nn.functional.normalize(torch.randn(len(targets), h, generator=gen), dim=-1)
    row = {t: i for i, t in enumerate(targets)}
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.mul_(1e-4)
        emb = lm.embed_tokens.weight
        emb.copy_(dirs[row[script[0]]].expand_as(emb))
        for tok, nxt in succ.items():
            emb[tok] = dirs[row[nxt]]
        head = model.lm_head.weight
        head.zero_()
        for t, i in row.items():
            head[t] = 10.0 * dirs[i]
        logits = dirs @ head.T  # [targets, V]: each direction must pick its own target clearly
        top2 = logits.topk(2, dim=-1)
        ok = (top2.indices[:, 0] == torch.tensor(targets)) & (top2.values[:, 0] - top2.values[:, 1] > 1.0)
        if not bool(ok.all()):
            raise ScriptError(f"script needs {len(targets)} distinct next tokens, too many to separate in "
                              f"hidden size {h}; shorten it or use a larger preset")
