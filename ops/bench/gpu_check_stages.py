"""The GPU check's stages, each run in a child process of `ops.bench.gpu_check` (so that a stage's
device memory is all returned before the next starts, and one stage's crash leaves the others'
results). Each stage takes a spec dict and returns a JSON-able dict.

- `probe`: versions, the device, what the kernels need (bf16 and fp8 products, `torch._grouped_mm`,
  a CUDA graph, Triton), and a copy's achieved memory bandwidth; under a minute.
- `parity`: the engine in bf16 on the device against transformers' fp32 references made on a CPU
  machine (ops/bench/gpu_check_refs.py): greedy tokens position by position; a disagreement is
  allowed where fp32's top-two gap is below 0.3 sigma (then that prompt's later positions are not
  comparable and are not counted).
- `speed`: the engine on the `gpu-bench` model with dummy weights (bf16, or FP8 experts):
  decode tokens/s at each batch (time of 1 + N output tokens minus time of 1, over B x N) and
  prefill tokens/s, with the HBM roofline of a decode step (bytes / bandwidth).
- `transformers`: transformers' `generate` on the same model, built directly on the device in bf16.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

SIGMA_SHARE = 0.3  # the bf16 rule: a disagreement is allowed where fp32's top-two gap < 0.3 sigma
FP8_BLOCK_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# -- probe ------------------------------------------------------------------------------------

def probe(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib.util

    import torch
    import transformers

    device = spec["device"]
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "transformers": transformers.__version__,
                           "mistral4": importlib.util.find_spec("transformers.models.mistral4") is not None,
                           "mistral_common": importlib.util.find_spec("mistral_common") is not None,
                           "triton": _version("triton"), "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    ref = a @ b
    out["bf16_matmul_rel_err"] = float(((a.bfloat16() @ b.bfloat16()).float() - ref).norm() / ref.norm())
    out["fp8_tensors"] = _tries(lambda: a.to(torch.float8_e4m3fn).float().sum().item())
    out["scaled_mm"] = _tries(lambda: torch._scaled_mm(  # [M, K] x [K, N] column-major, per-tensor scales
        a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t(),
        scale_a=torch.ones((), device=device), scale_b=torch.ones((), device=device), out_dtype=torch.bfloat16))
    offs = torch.tensor([256, 512, 1024], device=device, dtype=torch.int32)
    out["grouped_mm"] = _tries(lambda: torch._grouped_mm(
        a.bfloat16(), torch.randn(3, 1024, 256, device=device, dtype=torch.bfloat16), offs=offs))
    if device.startswith("cuda"):
        out["cuda_graph"] = _tries(lambda: _graph_replay(device))
        n = 2**30  # 1 GiB, copied: reads and writes 2 GiB
        src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
        dst.copy_(src)
        seconds = min(_timed(lambda: dst.copy_(src), device) for _ in range(5))
        out["copy_tb_s"] = round(2 * n / seconds / 1e12, 3)
    out["mla_triton_import"] = _tries(lambda: __import__("cluster.model.mla_triton"))
    return out


def _version(name: str) -> str | None:
    try:
        return str(__import__(name).__version__)
    except ImportError:
        return None


def _tries(fn: Any) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - a probe reports what fails, it does not stop
        return f"no: {type(exc).__name__}: {str(exc)[:160]}"


def _graph_replay(device: str) -> None:
    import torch

    x = torch.zeros(8, device=device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            y = x * 2 + 1
    x.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    if float(y.sum()) != 24.0:
        raise RuntimeError(f"graph replay gave {float(y.sum())}, expected 24")


# -- parity -----------------------------------------------------------------------------------

def parity(spec: dict[str, Any]) -> dict[str, Any]:
    from cluster.engine.sampling_params import SamplingParams
    from cluster.llm import LLM
    from ops.bench.gpu_check_refs import fingerprint

    rows = []
    for name in spec["checkpoints"]:
        ref = json.loads((Path(spec["refs_dir"]) / f"{name}.json").read_text())
        model_dir = Path(spec["ckpt_dir"]) / name
        row: dict[str, Any] = {"checkpoint": name, "weights": "fp8 block" if ref["fp8_block"] else ref["dtype"]}
        if not model_dir.is_dir() or fingerprint(model_dir) != ref["fingerprint"]:
            rows.append({**row, "verdict": "no checkpoint matching the reference (run ops.bench.gpu_check_refs)"})
            continue
        started = time.perf_counter()
        llm = LLM(model_dir, device=spec["device"], dtype=spec["dtype"], max_num_seqs=8,
                  kv_cache_bytes=256 * 2**20, enable_prefix_caching=False)
        engine = llm.engine
        assert engine is not None  # transport local
        params = SamplingParams(max_tokens=ref["new_tokens"], temperature=0.0, ignore_eos=True)
        outs = llm.generate([p["prompt"] for p in ref["prompts"]], params, use_tqdm=False)
        row.update(judge([list(o.token_ids) for o in outs], ref["prompts"]))
        row.update(seconds=round(time.perf_counter() - started, 1), graphs=engine.config.uses_cuda_graphs(),
                   attention=engine.config.resolved_attention_backend())
        engine.close()
        del llm, engine
        rows.append(row)
    return {"rows": rows}


def judge(got: list[list[int]], refs: list[dict[str, Any]]) -> dict[str, Any]:
    """Positions compared, agreed, allowed divergences (fp32 gap < 0.3 sigma) and violations."""
    compared = agreed = ties = 0
    violations: list[str] = []
    for p, (tokens, ref) in enumerate(zip(got, refs, strict=True)):
        for i, (a, b) in enumerate(zip(tokens, ref["tokens"], strict=False)):
            compared += 1
            if a == b:
                agreed += 1
                continue
            top1, top2 = ref["top2_logits"][i]
            if top1 - top2 < SIGMA_SHARE * ref["sigma"][i]:
                ties += 1
            else:
                violations.append(f"prompt {p} position {i}: {a} vs fp32 {b}, gap {top1 - top2:.3g} = "
                                  f"{(top1 - top2) / ref['sigma'][i]:.2f} sigma")
            break  # past a divergence the two continuations are not comparable
    return {"compared": compared, "agreed": agreed, "near_ties": ties, "violations": violations[:5],
            "verdict": "pass" if not violations else "FAIL"}


# -- speed ------------------------------------------------------------------------------------

def bench_model_dir(preset: str, fp8: bool, root: Path) -> Path:
    from cluster.testing.config_writer import write_config_only

    return write_config_only(root / f"{preset}-{'fp8' if fp8 else 'bf16'}", preset,
                             quantization_config=FP8_BLOCK_CONFIG if fp8 else None)


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randint(3, vocab - 1) for _ in range(length - 1)] for _ in range(batch)]


def speed(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cluster.engine.sampling_params import SamplingParams
    from cluster.llm import LLM

    device, n_new, length = spec["device"], spec["decode_tokens"], spec["prompt_len"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model_dir(spec["preset"], spec["fp8"], Path(tmp))
        started = time.perf_counter()
        llm = LLM(model_dir, load_format="dummy", device=device, dtype="bfloat16", max_num_seqs=max(spec["batches"]),
                  max_num_batched_tokens=spec["max_num_batched_tokens"], kv_cache_bytes=spec["kv_cache_bytes"],
                  enable_prefix_caching=False)
    engine = llm.engine
    assert engine is not None
    vocab = engine.text.vocab_size
    out: dict[str, Any] = {"fp8": spec["fp8"], "load_s": round(time.perf_counter() - started, 1),
                           "graphs": engine.config.uses_cuda_graphs(),
                           "attention": engine.config.resolved_attention_backend(), "decode": []}

    def run(prompts: list[list[int]], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        return _timed(lambda: llm.generate(prompts, params, use_tqdm=False), device)

    for batch in spec["batches"]:
        prompts = _prompts(batch, length, vocab, seed=batch)
        run(prompts, 2)  # warm-up: graphs, kernels' autotuning
        tps = decode_rate(lambda tokens, prompts=prompts: run(prompts, tokens), batch, n_new)
        bytes_step = decode_bytes(engine, batch, length + n_new // 2)
        roof = batch / (bytes_step / spec["bandwidth"])
        out["decode"].append({"batch": batch, "tokens_per_s": round(tps, 1), "step_ms": round(batch / tps * 1e3, 3),
                              "bytes_per_step": bytes_step, "roofline_tokens_per_s": round(roof, 1),
                              "share_of_roofline": round(tps / roof, 3)})
    prompts = _prompts(spec["prefill_batch"], spec["prefill_len"], vocab, seed=7)
    run(prompts, 1)
    seconds = min(run(prompts, 1) for _ in range(2))
    out["prefill"] = {"batch": spec["prefill_batch"], "prompt_len": spec["prefill_len"],
                      "tokens_per_s": round(spec["prefill_batch"] * spec["prefill_len"] / seconds, 1)}
    if device.startswith("cuda"):
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    engine.close()
    return out


def decode_rate(run: Any, batch: int, n_new: int) -> float:
    """Decode tokens/s: (time of 1 + n_new output tokens - time of 1) over batch x n_new, each the
    best of two runs (the first token is the prompt's prefill; what follows is decode alone)."""
    first = min(run(1) for _ in range(2))
    whole = min(run(1 + n_new) for _ in range(2))
    if whole <= first:  # noise larger than the decode itself (a loaded CPU in smoke runs)
        return float("nan")
    return batch * n_new / (whole - first)


def decode_bytes(engine: Any, batch: int, context: int) -> int:
    """What one decode step of `batch` sequences at `context` tokens must read from memory: every
    weight of the engine's model but the embedding table (only `batch` rows of it), the shared
    experts and lm_head among them; per MoE layer each distinct routed expert hit once (expected
    under uniform routing: E (1 - (1 - k/E)^B)); and the KV cache of every sequence."""
    text = engine.text
    dense = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)
    dense += batch * text.hidden_size * engine.model.embed_tokens.weight.element_size()
    shards = engine.dispatcher.shards
    held = sum(len(e.expert_ids) for s in shards for e in s.experts.values())  # (layer, expert) pairs
    per_expert = sum(s.resident_bytes() for s in shards) / held
    e, k = text.n_routed_experts, text.num_experts_per_tok
    hit = e * (1 - (1 - k / e) ** batch)
    routed = len(text.moe_layers) * hit * per_expert
    kv_per_token = sum(c[0, 0].numel() * c.element_size() for c in engine.caches)  # over layers
    return int(dense + routed + batch * context * kv_per_token)


# -- transformers -----------------------------------------------------------------------------

def transformers_generate(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import Mistral4ForCausalLM

    from cluster.testing.config_writer import mistral3_config

    device, n_new, length = spec["device"], spec["decode_tokens"], spec["prompt_len"]
    text_config = mistral3_config(spec["preset"]).text_config
    started = time.perf_counter()
    with torch.device(device):
        model = Mistral4ForCausalLM._from_config(text_config, dtype=torch.bfloat16).eval()
    out: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 1), "decode": []}

    def run(ids: torch.Tensor, tokens: int) -> float:
        def go() -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=0)
        return _timed(go, device)

    for batch in spec["batches"]:
        ids = torch.tensor(_prompts(batch, length, text_config.vocab_size, seed=batch), device=device)
        run(ids, 2)
        tps = decode_rate(lambda tokens, ids=ids: run(ids, tokens), batch, n_new)
        out["decode"].append({"batch": batch, "tokens_per_s": round(tps, 1)})
    return out


STAGES = {"probe": probe, "parity": parity, "speed": speed, "transformers": transformers_generate}
