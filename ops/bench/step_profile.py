"""Prefill step profile: what one fixed-size prefill chunk costs as the context before it grows,
the engine alone (`LLMEngine.step`) on the `long` preset, one request, in a child process.

Every step of the prompt's prefill is timed (wall), and its attention apart (hooks around each
layer's attention module): the rest of the step (embedding, MoE, norms, lm_head, the engine's
own work) should stay flat as the context grows, and attention should grow with chunk x context
and no more, so its time per query-key pair stays flat too. Steps are grouped by the context
before them; the last step (a partial chunk) is left out, and the last full chunk runs under
torch.profiler instead of the clock: where that step's time goes, by operator.

    python -m ops.bench.step_profile --smoke         # 8K tokens, 1K chunks: seconds (the test suite runs this)
    python -m ops.bench.step_profile --write-docs    # 256K tokens, 2K chunks; refreshes docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import (
    default_ckpt_dir,
    ensure_checkpoint,
    fixed_request,
    machine_line,
    replace_section,
    run_child,
    write_result,
)

SECTION = "step-profile"
PRESET = "long"
TOKEN_RANGE = (1000, 131071)


# -- the child -------------------------------------------------------------------------------------


def child_profile(spec: dict) -> dict:
    import torch

    from cluster import LLM, SamplingParams

    llm = LLM(spec["ckpt"], max_num_batched_tokens=spec["chunk"], max_model_len=spec["prompt_len"] + 2,
              kv_cache_bytes=spec["kv_cache_bytes"])
    engine = llm.engine
    assert engine is not None
    seen: dict[str, float] = {"attn_s": 0.0, "attn_cpu_s": 0.0, "start": 0.0, "start_cpu": 0.0, "new": 0,
                              "context": 0}

    def before(module: torch.nn.Module, args: tuple) -> None:
        meta = args[1]
        if module is attention[0]:  # the step's shape, once per step
            seen["new"] = int(meta.positions.shape[0])
            seen["context"] = int(meta.positions.min())
        seen["start"], seen["start_cpu"] = time.perf_counter(), time.process_time()

    def after(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["attn_s"] += time.perf_counter() - seen["start"]
        seen["attn_cpu_s"] += time.process_time() - seen["start_cpu"]

    attention = [layer.self_attn for layer in engine.model.layers]
    for module in attention:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    prompt = fixed_request(spec["seed"], spec["prompt_len"], 1, TOKEN_RANGE).prompt
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    from torch.profiler import ProfilerActivity, profile

    steps: list[dict] = []
    table = ""
    engine.add_request("profile", prompt, params)
    done = 0  # prompt tokens computed so far
    while engine.has_unfinished():
        seen["attn_s"] = seen["attn_cpu_s"] = 0.0
        profiled = spec["chunk"] <= spec["prompt_len"] - done < 2 * spec["chunk"]  # the last full chunk
        t0, c0 = time.perf_counter(), time.process_time()
        if profiled:  # under torch.profiler, and left out of the timings
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=spec["top"])
        else:
            engine.step()
        step = {"context": seen["context"], "new": seen["new"], "step_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0, "attn_s": seen["attn_s"], "attn_cpu_s": seen["attn_cpu_s"],
                "profiled": profiled}
        steps.append(step)
        done = seen["context"] + seen["new"]
        print(f"[profile] context {seen['context']:>7,} +{seen['new']}: {step['cpu_s'] * 1e3:8.1f} ms CPU "
              f"(attention {seen['attn_cpu_s'] * 1e3:8.1f} ms), {step['step_s'] * 1e3:8.1f} ms wall",
              file=sys.stderr, flush=True)
    engine.check_integrity()
    return {"steps": steps, "profile_table": table, "threads": torch.get_num_threads()}


def child_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    write_result(result_path, child_profile(spec))


# -- the report ------------------------------------------------------------------------------------


def buckets(steps: list[dict], n: int) -> list[list[dict]]:
    """The full-chunk steps in n groups of consecutive contexts."""
    full = [s for s in steps if s["new"] == max(x["new"] for x in steps) and not s["profiled"]]
    size = max(len(full) // n, 1)
    return [full[i:i + size] for i in range(0, len(full), size)][:n] if full else []


def build_report(args: argparse.Namespace, result: dict, ckpt: Path, command: str, wall_s: float) -> str:
    groups = buckets(result["steps"], args.groups)
    lines = [
        "## Prefill step profile: a fixed chunk as the context grows",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {machine_line(args.threads)}; "
        f"the whole run took {wall_s:.0f} s.",
        "",
        f"Checkpoint `{ckpt.name}` (preset `{PRESET}`), fp32 on CPUs, the engine alone in a child process: one "
        f"{args.prompt_len:,}-token prompt prefilled in {args.chunk:,}-token steps. Per group of steps (by the "
        "context before them, full chunks only), medians of the process's CPU time (steadier than wall time on "
        "a shared machine; `OMP_WAIT_POLICY=PASSIVE`, so waiting threads do not spin; wall beside it): the step, "
        "its attention (hooks around each layer's attention), the rest, and attention per query-key pair (chunk x "
        "(context + chunk / 2)): flat when a chunk's attention grows with chunk x context and no more; the rest "
        "flat when nothing else grows with the context.",
        "",
        "| context before the chunk | steps | step CPU (ms) | attention CPU (ms) | rest CPU (ms) | attention CPU "
        "ns / query-key pair | step wall (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for g in groups:
        step = statistics.median(s["cpu_s"] for s in g)
        attn = statistics.median(s["attn_cpu_s"] for s in g)
        rest = statistics.median(s["cpu_s"] - s["attn_cpu_s"] for s in g)
        pairs = statistics.median(s["new"] * (s["context"] + s["new"] / 2) for s in g)
        wall = statistics.median(s["step_s"] for s in g)
        rows.append((step, attn, rest, attn / pairs))
        lines.append(f"| {g[0]['context']:,} - {g[-1]['context']:,} | {len(g)} | {step * 1e3:,.1f} | "
                     f"{attn * 1e3:,.1f} | {rest * 1e3:,.1f} | {attn / pairs * 1e9:,.3f} | {wall * 1e3:,.1f} |")
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        lines += ["", f"Last group against the first: step {last[0] / first[0]:.2f}x, attention "
                      f"{last[1] / first[1]:.2f}x, rest **{last[2] / first[2]:.2f}x**, attention per query-key "
                      f"pair **{last[3] / first[3]:.2f}x** (the context grew "
                      f"{(groups[-1][-1]['context'] + 1) / (groups[0][0]['context'] + args.chunk / 2):.0f}x)."]
    wall = sum(s["step_s"] for s in result["steps"])
    cpu = sum(s["cpu_s"] for s in result["steps"])
    attn_cpu = sum(s["attn_cpu_s"] for s in result["steps"])
    lines += ["", f"The whole prefill: {len(result['steps'])} steps, {cpu:,.1f} s CPU ({attn_cpu / cpu:.0%} of it in "
                  f"attention), {wall:,.1f} s wall (one step under torch.profiler included)."]
    if result.get("profile_table"):
        lines += ["", f"torch.profiler over the last full {args.chunk:,}-token chunk (top "
                      f"{args.top} operators by self CPU time):", "", "```", result["profile_table"].rstrip(), "```"]
    for note in args.notes:
        lines += ["", note]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="8K tokens in 1K chunks: seconds")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="default: the cached long-preset checkpoint")
    ap.add_argument("--ckpt-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: 262144 (8192 smoke)")
    ap.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens; default 2048 (1024 smoke)")
    ap.add_argument("--kv-cache-bytes", type=int, default=64 * 2**20)
    ap.add_argument("--groups", type=int, default=8, help="rows of the table")
    ap.add_argument("--top", type=int, default=12, help="rows of the torch.profiler table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds the child may run")
    ap.add_argument("--note", dest="notes", action="append", default=[], help="a line added under the table")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prompt_len is None:
        args.prompt_len = 8192 if args.smoke else 262144
    if args.chunk is None:
        args.chunk = 1024 if args.smoke else 2048
    return args


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    raw = argv if argv is not None else sys.argv[1:]
    args = parse_args(raw)
    if args.child:
        child_main(args.spec, args.result)
        return 0
    ckpt = ensure_checkpoint(args.ckpt_dir or default_ckpt_dir(PRESET, args.ckpt_seed), PRESET, args.ckpt_seed)
    spec = {"ckpt": str(ckpt), "prompt_len": args.prompt_len, "chunk": args.chunk, "seed": args.seed,
            "kv_cache_bytes": args.kv_cache_bytes, "threads": args.threads, "top": args.top}
    # Idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting for a core.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        result = run_child("ops.bench.step_profile", "profile", spec, Path(tmp), args.threads, args.timeout)
    report = build_report(args, result, ckpt, "python -m ops.bench.step_profile " + shlex.join(raw),
                          time.perf_counter() - t0)
    print(report)
    if args.write_docs:
        print(f"wrote {replace_section(SECTION, report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
