"""`moe-cluster check`: the checks before start on a model directory, and a summary of the model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.model.preflight import ModelReport


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help="check a model directory before serving it (headers only) and summarize the model",
        description="Runs the checks that `serve` and `generate` run before they start: config.json parses; every "
                    "tensor the engine reads is in the safetensors files with the shape and dtype config.json "
                    "implies (FP8 scales included); the index's files exist; tekken.json's image section matches "
                    "the vision tower. Reads config.json, the safetensors headers and tekken.json only, never "
                    "weight bytes. Prints parameters, dtype and quantization, layers, experts, vision, tokenizer "
                    "version and KV bytes per token; a problem prints one line naming the file, tensor or field "
                    "and exits with status 2.")
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (default: the embedded tiny checkpoint, made once and cached)")


def run(args: argparse.Namespace) -> int:
    from cluster.model.preflight import check_model_dir
    from deployments.config import resolve_model_dir

    model_dir = resolve_model_dir(str(args.model) if args.model is not None else None)
    report = check_model_dir(model_dir)
    print("\n".join(summary_lines(report)))
    return 0


def summary_lines(report: ModelReport) -> list[str]:
    from cluster.model.footprint import fmt_bytes

    c, t = report.config, report.config.text
    params = report.params_by_part
    total = sum(params.values())
    quant = report.quant.describe() if report.quant else "none"
    lines = [
        f"model: {report.model_dir} (model_type {c.model_type}); all checks passed",
        f"parameters: {total:,} = dense {params['dense']:,} + routed experts {params['experts']:,}"
        + (f" + vision {params['vision']:,}" if c.vision is not None else ""),
        f"weights: {fmt_bytes(sum(report.bytes_by_part.values()))} in {report.files} file(s); dtype {report.dtype}; "
        f"quantization {quant}",
        f"layers: {t.num_hidden_layers} ({len(t.moe_layers)} MoE), hidden {t.hidden_size}, "
        f"{t.num_attention_heads} heads, MLA kv_lora_rank {t.kv_lora_rank} + rope {t.qk_rope_head_dim}, "
        f"lm_head {'tied to the embeddings' if report.tied_lm_head else 'its own'}",
        f"experts: {t.n_routed_experts} routed (top {t.num_experts_per_tok}) + {t.n_shared_experts} shared, "
        f"intermediate {t.moe_intermediate_size}, layout {report.expert_layout}",
    ]
    if c.vision is None:
        lines.append("vision: none")
    else:
        from cluster.model.preflight import vision_field

        def field(name: str) -> object:
            return vision_field(c, name)

        lines.append(f"vision: Pixtral, {field('num_hidden_layers')} layers, hidden {field('hidden_size')}, "
                     f"patch {field('patch_size')}, spatial merge {c.spatial_merge_size}, "
                     f"max image {field('image_size')}")
    lines.append(f"tokenizer: tekken {report.tokenizer_version}")
    lines.append(f"KV cache: {report.kv_bytes_per_token:,} bytes per token "
                 f"(({t.kv_lora_rank} + {t.qk_rope_head_dim}) x {t.num_hidden_layers} layers x "
                 f"{report.kv_bytes_per_token // (t.latent_dim * t.num_hidden_layers)} bytes)")
    return lines
