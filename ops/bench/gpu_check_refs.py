"""The GPU check's parity checkpoints and their fp32 references, made HERE (a CPU machine with
mistral-common and transformers): the GPU machine has no mistral-common and another transformers,
so it neither writes checkpoints nor computes references; both travel to it.

    python -m ops.bench.gpu_check_refs [--ckpt-dir .gpu_check/ckpt] [--refs-dir ops/bench/gpu_check_refs]

Checkpoints (written by the project's checkpoint writer, small vocabularies so all three travel in
a few MiB; their tekken.json cut to its header, since the check passes token ids and the engine
needs no tokenizer for them):
- `tiny`: the tiny preset (fp32 weights);
- `wide`: a second shape in bf16 weights (hidden 128, 8 heads, kv_lora 64, rope 32, 32 experts, a
  dense first layer, 3 layers);
- `fp8`: the tiny preset in FP8 with [16, 16] weight blocks (transformers' format); its reference
  runs on the dequantized weights (every fp8 value times its block's scale), in fp32.

References: per prompt, transformers' fp32 greedy tokens and at every generated position the top
two logits (ids, values) and the standard deviation of the logits over the vocabulary (the bf16
rule's sigma). Each file carries the SHA-256 of its checkpoint's weights and config, so the check
refuses to compare against a checkpoint that is not the one the reference was computed on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.bench.common import REPO_ROOT

DEFAULT_CKPT_DIR = REPO_ROOT / ".gpu_check" / "ckpt"
DEFAULT_REFS_DIR = REPO_ROOT / "ops" / "bench" / "gpu_check_refs"
PROMPT_LENS = (7, 19, 33, 61)
NEW_TOKENS = 32


@dataclass(frozen=True)
class ParityCheckpoint:
    name: str
    seed: int
    text_overrides: dict[str, Any]
    dtype: str = "float32"
    fp8_block: tuple[int, int] | None = None
    prompt_lens: tuple[int, ...] = PROMPT_LENS
    new_tokens: int = NEW_TOKENS
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return int(self.text_overrides["vocab_size"])


def _wide_text() -> dict[str, Any]:
    from cluster.testing.presets import yarn

    return {"vocab_size": 2048, "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8,
            "num_key_value_heads": 8, "q_lora_rank": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 32,
            "qk_nope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 32, "num_experts_per_tok": 4,
            "moe_intermediate_size": 64, "intermediate_size": 256, "first_k_dense_replace": 1,
            "rope_parameters": yarn(512, 16.0, 32, 64), "initializer_range": 0.05}


def parity_checkpoints() -> list[ParityCheckpoint]:
    return [ParityCheckpoint("tiny", 0, {"vocab_size": 1024}),
            ParityCheckpoint("wide", 1, _wide_text(), dtype="bfloat16"),
            ParityCheckpoint("fp8", 2, {"vocab_size": 1024}, fp8_block=(16, 16))]


def prompts_of(ck: ParityCheckpoint) -> list[list[int]]:
    """Seeded token-id prompts inside the checkpoint's vocabulary (control ids 0..2 left out)."""
    rng = random.Random(1000 + ck.seed)
    return [[1] + [rng.randint(3, ck.vocab - 1) for _ in range(n - 1)] for n in ck.prompt_lens]


def fingerprint(model_dir: Path) -> str:
    """SHA-256 over config.json and the safetensors files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for path in sorted([model_dir / "config.json", *model_dir.glob("*.safetensors")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def write_checkpoint(ck: ParityCheckpoint, out: Path) -> Path:
    from cluster.testing.checkpoint_writer import make_checkpoint

    if out.exists():
        shutil.rmtree(out)
    make_checkpoint(out, "tiny", seed=ck.seed, text_overrides=ck.text_overrides, dtype=ck.dtype,
                    fp8="block" if ck.fp8_block else None, fp8_block=ck.fp8_block or (128, 128))
    tekken = out / "tekken.json"  # the header alone: config, special tokens, image section
    data = json.loads(tekken.read_text())
    data["vocab"] = []
    tekken.write_text(json.dumps(data))
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


def dequantized_copy(fp8_dir: Path, out: Path) -> Path:
    """An fp32 checkpoint of the FP8 one's values (block-scaled), with no quantization_config."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        plain: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            scale = tensors.get(name.removesuffix(".weight") + ".weight_scale_inv") if name.endswith(".weight") \
                else tensors.get(f"{name}_scale_inv")
            plain[name] = t.float() if scale is None else _dequantize(t, scale, tuple(block))
        save_file(plain, file, metadata={"format": "pt"})
    return out


def _dequantize(q: Any, scale: Any, block: tuple[int, int]) -> Any:
    rows, cols = q.shape[-2:]  # q [..., N, K], scale [..., ceil(N/b0), ceil(K/b1)]
    full = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return q.float() * full[..., :rows, :cols]


def reference(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[dict[str, Any]]:
    """transformers in fp32: greedy tokens and, per position, top-2 ids and logits and sigma."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    out = []
    for prompt in prompts:
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                 pad_token_id=0, logits_to_keep=1)
        steps = [logits[0].float() for logits in gen.logits]  # each [V]
        top = [s.topk(2) for s in steps]
        out.append({"prompt": prompt, "tokens": gen.sequences[0, len(prompt):].tolist(),
                    "top2_ids": [t.indices.tolist() for t in top],
                    "top2_logits": [[round(v, 5) for v in t.values.tolist()] for t in top],
                    "sigma": [round(float(s.std()), 5) for s in steps]})
    return out


def prepare(ckpt_dir: Path, refs_dir: Path | None, names: list[str] | None = None) -> dict[str, Path]:
    """Writes the checkpoints under `ckpt_dir`; with `refs_dir`, their references there too."""
    made = {}
    for ck in parity_checkpoints():
        if names and ck.name not in names:
            continue
        model_dir = write_checkpoint(ck, ckpt_dir / ck.name)
        made[ck.name] = model_dir
        if refs_dir is None:
            continue
        prompts = prompts_of(ck)
        with tempfile.TemporaryDirectory() as tmp:
            ref_dir = dequantized_copy(model_dir, Path(tmp) / "ref") if ck.fp8_block else model_dir
            rows = reference(ref_dir, prompts, ck.new_tokens)
        refs_dir.mkdir(parents=True, exist_ok=True)
        doc = {"name": ck.name, "fingerprint": fingerprint(model_dir), "dtype": ck.dtype,
               "fp8_block": list(ck.fp8_block) if ck.fp8_block else None, "new_tokens": ck.new_tokens,
               "command": "python -m ops.bench.gpu_check_refs", "prompts": rows}
        (refs_dir / f"{ck.name}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return made


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", type=Path, default=DEFAULT_CKPT_DIR, help="where the checkpoints go")
    p.add_argument("--refs-dir", type=Path, default=DEFAULT_REFS_DIR, help="where the reference files go")
    p.add_argument("--no-refs", action="store_true", help="checkpoints only (the committed references stay)")
    p.add_argument("--only", nargs="*", default=None, help="names of the checkpoints to make (default: all)")
    args = p.parse_args(argv)
    made = prepare(args.ckpt_dir, None if args.no_refs else args.refs_dir, args.only)
    for name, path in made.items():
        print(f"{name}: {path} ({sum(f.stat().st_size for f in path.iterdir()) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
