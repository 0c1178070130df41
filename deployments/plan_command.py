"""`moe-cluster plan`: a memory plan for a cluster of GPUs, and the Serve config that deploys it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.errors import ConfigError

if TYPE_CHECKING:
    from deployments.memory_plan import MemoryPlan

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'140GiB', '141 GB', '1.5TiB' or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give e.g. 140GiB, 141GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="plan GPU memory for a model and write the Serve config that deploys it",
        description="Plans where a model's parts go on a cluster of GPUs (the memory model is in "
                    "docs/OPERATIONS.md): bytes of the dense part, of each routed expert and of the vision tower "
                    "in the checkpoint's dtype; KV bytes per token; a layout (expert shards and experts per "
                    "shard, engine replicas and the KV capacity of each in sequences of --context tokens). A "
                    "layout that does not fit prints one line naming the shortfall and exits with status 2.",
        epilog="example: moe-cluster plan --model /models/Mistral-Small-4-119B-2603 --nodes 1 --gpus-per-node 2 "
               "--gpu-memory 140GiB --context 262144 --batch 4 --write-config serve.yaml")
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (default: the embedded tiny checkpoint); its safetensors headers are read "
                        "(and checked as `moe-cluster check` does), never its weights")
    p.add_argument("--config-only", action="store_true",
                   help="read config.json alone (a model not downloaded yet): bytes come from the tensors config.json "
                        "implies, in its dtype (FP8 with its quantization_config)")
    p.add_argument("--dtype", default=None,
                   help="with --config-only: the unquantized dtype (float32, bfloat16, float16) when config.json "
                        "names none")
    p.add_argument("--nodes", type=_positive, required=True, help="nodes in the cluster")
    p.add_argument("--gpus-per-node", type=_positive, required=True, help="GPUs on each node")
    p.add_argument("--gpu-memory", type=parse_size, required=True,
                   help="memory of one GPU, e.g. 140GiB (an H200), 80GiB (an H100)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of each GPU's memory the plan may fill (default 0.9; the rest is the CUDA context, "
                        "allocator slack and anything else on the GPU)")
    p.add_argument("--context", type=_positive, default=262144,
                   help="tokens of one sequence the KV cache must hold (default 262144)")
    p.add_argument("--batch", type=_positive, default=4,
                   help="sequences of --context tokens every engine replica must hold at once (default 4)")
    p.add_argument("--activation-reserve", type=parse_size, default=None,
                   help="activation memory set aside per engine replica (default: a full-context prefill chunk's "
                        "expanded keys and values plus a step's logits; see docs/OPERATIONS.md)")
    p.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu",
                   help="cpu: plan CPU nodes, each 'GPU' a slot of --gpu-memory of host memory; the written config "
                        "then asks Ray for no GPUs (default gpu)")
    p.add_argument("--write-config", type=Path, default=None,
                   help="write the Serve config of the layout to this file: `moe-cluster serve --config FILE`, "
                        "`serve deploy FILE`, or the serveConfigV2 of a k8s overlay")


def run(args: argparse.Namespace) -> int:
    from cluster.model.footprint import footprint_of_config, footprint_of_report
    from cluster.model.preflight import check_model_dir
    from deployments.config import resolve_model_dir
    from deployments.memory_plan import ClusterSpec, Workload, plan_layout

    model_dir = resolve_model_dir(str(args.model) if args.model is not None else None)
    if args.config_only:
        fp = footprint_of_config(model_dir, args.dtype)
    else:
        if args.dtype is not None:
            raise ConfigError("--dtype is for --config-only; with headers the checkpoint's own dtype is used")
        fp = footprint_of_report(check_model_dir(model_dir))
    cluster = ClusterSpec(args.nodes, args.gpus_per_node, args.gpu_memory, args.memory_fraction, args.accelerator)
    plan = plan_layout(fp, cluster, Workload(args.context, args.batch, engine_reserve=args.activation_reserve))
    print("\n".join(plan_lines(plan, model_dir)))
    if args.write_config is not None:
        write_serve_config(plan, model_dir, args.write_config)
        print(f"wrote the Serve config to {args.write_config}")
    return 0


def plan_lines(plan: MemoryPlan, model_dir: Path) -> list[str]:
    from cluster.model.footprint import fmt_bytes as fmt

    fp, c, w, r = plan.footprint, plan.cluster, plan.workload, plan.reserves
    t = fp.config.text
    lines = [
        f"model: {model_dir} (from {fp.source}; {fp.describe_dtype()})",
        f"weights: dense {fmt(fp.dense_bytes)} ({fp.dense_bytes:,} bytes); each expert {fp.bytes_per_expert:,} bytes "
        f"x {fp.num_experts} experts x {fp.moe_layers} layers = {fmt(fp.expert_bytes)}; vision "
        f"{fmt(fp.vision_bytes)}; total {fmt(fp.total_bytes)}",
        f"KV: {fp.kv_bytes_per_token:,} bytes per token (({t.kv_lora_rank} + {t.qk_rope_head_dim}) x "
        f"{t.num_hidden_layers} layers x {fp.act_bytes} bytes); {w.context:,} tokens = "
        f"{fmt(plan.kv_bytes_per_sequence)}; x {w.batch} = {fmt(w.batch * plan.kv_bytes_per_sequence)}",
        f"activation reserves: engine {fmt(r.engine)}, expert shard {fmt(r.shard)}, vision encoder {fmt(r.vision)}",
        f"GPUs: {c.nodes} node(s) x {c.gpus_per_node} x {fmt(c.gpu_memory)} x {c.memory_fraction:g} = "
        f"{fmt(c.usable)} usable each ({c.accelerator})",
        f"layout: transport {plan.transport}, "
        + (f"{plan.num_expert_shards} expert shard(s) of {plan.experts_per_shard} experts per layer, "
           if plan.num_expert_shards else "experts in every engine, ")
        + f"{plan.num_engines} engine replica(s) with {fmt(plan.engine_kv_bytes)} of KV each: "
          f"{plan.sequences_per_engine} sequence(s) of {w.context:,} tokens ({w.batch} asked)",
    ]
    for gpu in plan.gpus:
        parts = ", ".join(f"{what} {fmt(b)}" for what, b in gpu.items) or "empty"
        lines.append(f"  GPU {gpu.index} (node {gpu.node}): {parts}; {fmt(c.usable - gpu.used)} left")
    return lines


def serve_config(plan: MemoryPlan, model_dir: Path) -> dict[str, Any]:
    """The Serve config (the shape of deployments/serve_config.yaml) of a plan: the layout in the
    application's args (AppConfig fields)."""
    from deployments.config import GRPC_SERVICER_FUNCTIONS, AppConfig

    c, w, usable = plan.cluster, plan.workload, plan.cluster.usable
    gpu = c.accelerator == "gpu"
    defaults = AppConfig()
    args: dict[str, Any] = {
        "model": str(Path(model_dir).resolve()),
        "transport": plan.transport,
        "num_expert_shards": plan.num_expert_shards,
        "num_engine_replicas": plan.num_engines,
        # each replica (and each expert shard) asks Ray for the share of a GPU its memory takes
        "engine_num_gpus": _share(plan.engine_bytes(), usable) if gpu else 0.0,
        "shard_num_gpus": _share(plan.shard_bytes(), usable) if gpu and plan.num_expert_shards else 0.0,
        "engine": {"kv_cache_bytes": plan.engine_kv_bytes, "max_model_len": w.context,
                   "max_num_seqs": w.max_num_seqs, "block_size": w.block_size,
                   **({"device": "cuda", "dtype": "bfloat16"} if gpu else {})},
        "vision": {"num_replicas": 1 if plan.vision_bytes() else 0,
                   "num_gpus": _share(plan.vision_bytes(), usable) if gpu and plan.vision_bytes() else 0.0},
        "http_port": defaults.http_port,
        "grpc_port": defaults.grpc_port,
    }
    AppConfig.model_validate(args)  # what `serve --config` and the app builder will accept
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": defaults.http_port},
        "grpc_options": {"port": defaults.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
                         "enable_reflection": False},
        "applications": [{"name": defaults.app_name, "route_prefix": defaults.route_prefix,
                          "import_path": "deployments.app:app_builder", "args": args}],
    }


def _share(nbytes: int, usable: int) -> float:
    return min(1.0, max(0.01, -(-nbytes * 100 // usable) / 100))


def write_serve_config(plan: MemoryPlan, model_dir: Path, path: Path) -> None:
    import yaml

    header = "".join(f"# {line}\n" for line in [
        "Written by `moe-cluster plan` (docs/OPERATIONS.md, Memory plan). Use it with",
        "`moe-cluster serve --config FILE`, `serve deploy FILE`, or as a k8s overlay's serve_config.yaml.",
        *plan_lines(plan, model_dir)])
    text = header + yaml.safe_dump(serve_config(plan, model_dir), sort_keys=False)
    try:
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
