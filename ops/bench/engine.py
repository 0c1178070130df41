"""The engine against `transformers` `generate()`: output tokens/s on a mixed workload, and
batch-1 latency, on the same checkpoint, fp32, the same thread count on every side.

Sides, each measured in its own child process, alternating, in one run:

  engine       `cluster.LLM.generate` over every request at once (continuous batching)
  hf-batch8    `transformers` generate() on left-padded static batches of 8, in arrival order
  hf-all       `transformers` generate() on one left-padded batch of every request

Each child reports output tokens/s (useful output tokens / wall time of generation, model load
and a short warm-up excluded), its token count (checked here against the workload) and its
peak RSS. The engine and hf-batch8 children then time one request alone: time to first token
and mean inter-token latency.

    python -m ops.bench.engine --smoke            # tiny checkpoint, seconds (the test suite runs this)
    python -m ops.bench.engine --write-docs       # the full run; refreshes docs/BENCHMARKS.md
    python -m ops.bench.engine --profile-only     # where the engine's time goes, cProfile + torch.profiler
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import (
    cpu_seconds,
    ensure_checkpoint,
    fixed_request,
    machine_line,
    make_workload,
    replace_section,
    run_child,
    write_result,
)

_T_START = time.perf_counter()
MODULE = "ops.bench.engine"
SECTION = "engine"
GOAL = 3.0  # times the better transformers reference, from the issue
SIDES = ("engine", "hf-batch8", "hf-all")
REFERENCES = ("hf-batch8", "hf-all")
TOKEN_LOW = 1000  # random prompt ids from here to the top of the vocabulary: no control tokens


# -- the sides (run in children) ----------------------------------------------------------------


def _sampling(max_tokens: int):  # noqa: ANN202
    from cluster import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _load_engine(spec: dict):  # noqa: ANN202
    from cluster import LLM

    e = spec["engine"]
    llm = LLM(spec["ckpt"], block_size=e["block_size"], num_kv_blocks=e["num_kv_blocks"],
              max_num_seqs=e["max_num_seqs"], max_num_batched_tokens=e["max_num_batched_tokens"])
    llm.generate([list(range(TOKEN_LOW, TOKEN_LOW + 8))], _sampling(2), use_tqdm=False)  # warm-up
    return llm


def engine_latency(engine, prompt: list[int], max_tokens: int) -> dict:  # noqa: ANN001
    """One request alone through `LLMEngine.step`: seconds to its first token, then the mean gap
    between its tokens."""
    engine.add_request("latency", prompt, _sampling(max_tokens))
    stamps: list[float] = []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            stamps.extend([now] * len(out.new_token_ids))
    if len(stamps) != max_tokens:
        raise SystemExit(f"latency request produced {len(stamps)} tokens, asked for {max_tokens}")
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft_s": stamps[0] - t0, "itl_s": itl, "prompt_tokens": len(prompt), "output_tokens": max_tokens}


def child_engine(spec: dict) -> dict:
    import torch

    t = time.perf_counter()
    llm = _load_engine(spec)
    load_s = time.perf_counter() - t
    reqs = spec["requests"]
    prompts = [p for p, _ in reqs]
    params = [_sampling(n) for _, n in reqs]
    before = llm.engine.stats()
    t0, c0 = time.perf_counter(), cpu_seconds()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, gen_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    for i, (o, (_, n)) in enumerate(zip(outs, reqs, strict=True)):
        if len(o.token_ids) != n or o.finish_reason != "length":
            raise SystemExit(f"engine request {i}: {len(o.token_ids)} tokens ({o.finish_reason}), asked for {n}")
    useful = sum(len(o.token_ids) for o in outs)
    stats = llm.engine.stats()
    result = {"wall_s": wall, "gen_cpu_s": gen_cpu, "load_s": load_s, "useful_tokens": useful,
              "computed_tokens": useful,
              "detail": f"{stats.forward_calls - before.forward_calls} steps, "
                        f"{stats.num_preemptions - before.num_preemptions} preemptions",
              "threads": torch.get_num_threads()}
    if spec.get("latency"):
        lat = spec["latency"]
        result["latency"] = engine_latency(llm.engine, lat["prompt"], lat["max_tokens"])
    return result


def _load_hf(spec: dict):  # noqa: ANN202
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(spec["ckpt"], dtype=torch.float32).eval()
    _hf_generate(model, [[list(range(TOKEN_LOW, TOKEN_LOW + 8)), 2]], spec["pad_token_id"])  # warm-up
    return model


def _hf_generate(model, batch: list, pad: int, max_new: int | None = None) -> int:  # noqa: ANN001
    """One left-padded static batch, greedy, EOS off; returns the tokens generated per row."""
    import torch

    width = max(len(p) for p, _ in batch)
    max_new = max_new or max(n for _, n in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (p, _) in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=None, pad_token_id=pad)
    generated = out.shape[1] - width
    if generated != max_new:
        raise SystemExit(f"transformers generated {generated} tokens per row, asked for {max_new}")
    return generated


def child_hf(spec: dict) -> dict:
    import torch

    t = time.perf_counter()
    model = _load_hf(spec)
    load_s = time.perf_counter() - t
    reqs, size, pad = spec["requests"], spec["batch_size"], spec["pad_token_id"]
    useful = computed = 0
    t0, c0 = time.perf_counter(), cpu_seconds()
    for i in range(0, len(reqs), size):
        batch = reqs[i:i + size]
        generated = _hf_generate(model, batch, pad)
        useful += sum(min(n, generated) for _, n in batch)
        computed += generated * len(batch)
    wall, gen_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    result = {"wall_s": wall, "gen_cpu_s": gen_cpu, "load_s": load_s, "useful_tokens": useful,
              "computed_tokens": computed,
              "detail": f"experts={model.config.text_config._experts_implementation}, "
                        f"attn={model.config.text_config._attn_implementation}",
              "threads": torch.get_num_threads()}
    if spec.get("latency"):
        lat = spec["latency"]
        one = [[lat["prompt"], lat["max_tokens"]]]
        t = time.perf_counter()
        _hf_generate(model, one, pad, max_new=1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        _hf_generate(model, one, pad)
        tn = time.perf_counter() - t
        n = lat["max_tokens"]
        result["latency"] = {"ttft_s": t1, "itl_s": (tn - t1) / (n - 1) if n > 1 else float("nan"),
                             "prompt_tokens": len(lat["prompt"]), "output_tokens": n}
    return result


def child_profile(spec: dict) -> dict:
    """The engine over the workload's first `steps` steps under cProfile, then `torch_steps` more
    under torch.profiler; step wall times split into steps with prefill tokens and decode-only."""
    import cProfile
    import pstats

    import torch

    llm = _load_engine(spec)
    eng = llm.engine
    prof_spec = spec["profile"]
    for i, (p, n) in enumerate(spec["requests"]):
        eng.add_request(f"bench-{i}", p, _sampling(n))
    last: list = []
    schedule = eng.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        last[:] = [(s.num_new, s.seq.num_computed) for s in out]
        return out

    eng.scheduler.schedule = recording_schedule
    for _ in range(prof_spec.get("skip", 0)):  # unprofiled, e.g. to start in the decode phase
        if eng.has_unfinished():
            eng.step()
    kinds = {"prefill": [0, 0.0, 0, 0], "decode": [0, 0.0, 0, 0]}  # steps, seconds, tokens, seqs
    prof = cProfile.Profile()
    total = 0.0
    for _ in range(prof_spec["steps"]):
        if not eng.has_unfinished():
            break
        t = time.perf_counter()
        prof.enable()
        eng.step()
        prof.disable()
        dt = time.perf_counter() - t
        total += dt
        k = kinds["prefill" if any(n > 1 for n, _ in last) else "decode"]
        k[0] += 1
        k[1] += dt
        k[2] += sum(n for n, _ in last)
        k[3] += len(last)
    lines = [f"cProfile over {kinds['prefill'][0] + kinds['decode'][0]} engine steps after "
             f"{prof_spec.get('skip', 0)} unprofiled ones, {total:.2f} s "
             f"(profiler overhead included):"]
    for name, (steps, secs, toks, seqs) in kinds.items():
        if steps:
            lines.append(f"  {name:>7} steps: {steps:4d}, {secs:7.2f} s ({100 * secs / total:4.1f}%), "
                         f"{secs / steps * 1e3:8.1f} ms/step, {toks / steps:7.1f} tokens/step, "
                         f"{seqs / steps:5.1f} seqs/step")
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}

    def where(key: tuple) -> str:
        file, line, func = key
        if file == "~":
            return func
        short = file.split("/site-packages/")[-1].split("/work/main/")[-1]
        return f"{short}:{line}({func})"

    top = prof_spec["top"]
    lines.append("")
    lines.append(f"top {top} functions by self time:")
    lines.append(f"  {'self s':>8} {'%':>5} {'calls':>9} {'cum s':>8}  function")
    for key, (_, nc, tt, ct, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"  {tt:8.2f} {100 * tt / total:5.1f} {nc:9d} {ct:8.2f}  {where(key)}")
    lines.append("")
    lines.append(f"top {top} engine (cluster/) functions by cumulative time:")
    lines.append(f"  {'cum s':>8} {'%':>5} {'calls':>9} {'self s':>8}  function")
    ours = [(k, v) for k, v in stats.items() if "/cluster/" in k[0]]
    for key, (_, nc, tt, ct, _) in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
        lines.append(f"  {ct:8.2f} {100 * ct / total:5.1f} {nc:9d} {tt:8.2f}  {where(key)}")
    if prof_spec["torch_steps"] > 0 and eng.has_unfinished():
        from torch.profiler import ProfilerActivity, profile

        n_steps, t = 0, time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as tp:
            for _ in range(prof_spec["torch_steps"]):
                if not eng.has_unfinished():
                    break
                eng.step()
                n_steps += 1
        wall = time.perf_counter() - t
        events = sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)
        own = sum(e.self_cpu_time_total for e in events) / 1e6
        lines.append("")
        lines.append(f"torch.profiler over the next {n_steps} steps ({wall:.2f} s wall, {own:.2f} s in torch ops; "
                     f"the rest is Python between ops), top {top} ops by self CPU time:")
        lines.append(f"  {'self s':>8} {'% wall':>6} {'calls':>9}  op")
        for e in events[:top]:
            lines.append(f"  {e.self_cpu_time_total / 1e6:8.3f} {100 * e.self_cpu_time_total / 1e6 / wall:6.1f} "
                         f"{e.count:9d}  {e.key}")
    return {"profile_text": "\n".join(lines), "threads": torch.get_num_threads()}


CHILDREN = {"engine": child_engine, "hf-batch8": child_hf, "hf-all": child_hf, "profile": child_profile}


def child_main(side: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    print(f"[{side}] starting after {time.perf_counter() - _T_START:.1f} s of imports "
          f"({len(spec['requests'])} requests, {spec['threads']} threads)", file=sys.stderr, flush=True)
    result = CHILDREN[side](spec)
    result["side"] = side
    print(f"[{side}] done in {time.perf_counter() - t0:.1f} s (load and warm-up {result.get('load_s', 0):.1f} s)",
          file=sys.stderr, flush=True)
    write_result(result_path, result)


# -- the parent -----------------------------------------------------------------------------------


LABELS = {
    "engine": "engine: `LLM.generate`, all requests at once",
    "hf-batch8": "transformers `generate()`, static batches of 8",
    "hf-all": "transformers `generate()`, one batch of all",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m ops.bench.engine",
        description="Benchmark the engine (cluster.LLM) against transformers generate() on the same\n"
                    "checkpoint: output tokens/s on a mixed workload (each side in its own child process,\n"
                    "alternating), peak memory, and batch-1 latency. Prints a markdown table; --write-docs\n"
                    "puts it into docs/BENCHMARKS.md.",
        epilog="examples:\n" + "\n".join(
            "  " + line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith("python -m")),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny checkpoint, 8 requests (prompts 8..64, outputs 4..16), the engine and both "
                         "references; seconds. Does not write docs unless --write-docs is given")
    ap.add_argument("--write-docs", action="store_true",
                    help="replace the bench:engine section of docs/BENCHMARKS.md with this run's table")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every child (default: the CPUs this process may use)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the workload (lengths and token ids); default %(default)s")
    ap.add_argument("--ckpt-dir", type=Path, default=None,
                    help="checkpoint directory, reused when its moe_cluster.json names the same preset and "
                         "seed, else written there (default: ~/.cache/moe-cluster/<preset>-seed<ckpt-seed>)")
    ap.add_argument("--ckpt-seed", type=int, default=0, help="seed of the random checkpoint; default %(default)s")
    ap.add_argument("--preset", default=None, help="checkpoint preset (default: bench; tiny with --smoke)")
    ap.add_argument("--num-requests", type=int, default=None, help="default: 64 (8 with --smoke)")
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="prompt lengths, uniform inclusive (default: 16 1024; 8 64 with --smoke)")
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="output lengths, uniform inclusive (default: 16 256; 4 16 with --smoke)")
    ap.add_argument("--latency", type=int, nargs=2, metavar=("PROMPT", "OUTPUT"), default=None,
                    help="the batch-1 latency request (default: 256 64; 16 4 with --smoke); 0 0 skips it")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated sides to run, from {', '.join(SIDES)}; default all")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of all sides, alternating; the table reports each side's median; default %(default)s")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="the engine's per-step token budget; default %(default)s")
    ap.add_argument("--block-size", type=int, default=16, help="the engine's KV block size; default %(default)s")
    ap.add_argument("--profile", action="store_true",
                    help="after the sides, profile the engine on the same workload (cProfile over the first "
                         "--profile-steps steps, then torch.profiler over --torch-profile-steps more) and print "
                         "the top functions by self time; with --write-docs the profile goes into the docs too")
    ap.add_argument("--profile-only", action="store_true", help="run only the profile, no sides")
    ap.add_argument("--profile-skip", type=int, default=0,
                    help="engine steps run before profiling starts (e.g. 20 to profile the decode phase only); "
                         "default %(default)s")
    ap.add_argument("--profile-steps", type=int, default=80, help="engine steps under cProfile; default %(default)s")
    ap.add_argument("--torch-profile-steps", type=int, default=6,
                    help="engine steps under torch.profiler; default %(default)s")
    ap.add_argument("--profile-top", type=int, default=15, help="rows in each profile table; default %(default)s")
    ap.add_argument("--child-timeout", type=float, default=None,
                    help="seconds each child may run (default: 120 with --smoke, else 7200)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "bench")
    args.num_requests = args.num_requests or (8 if smoke else 64)
    args.prompt_len = tuple(args.prompt_len or ((8, 64) if smoke else (16, 1024)))
    args.output_len = tuple(args.output_len or ((4, 16) if smoke else (16, 256)))
    args.latency = tuple(args.latency or ((16, 4) if smoke else (256, 64)))
    args.child_timeout = args.child_timeout or (120.0 if smoke else 7200.0)
    if args.threads is None:
        import os

        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for s in args.sides:
        if s not in SIDES:
            ap.error(f"unknown side {s!r}; choose from {', '.join(SIDES)}; default all")
    for name, (lo, hi) in (("--prompt-len", args.prompt_len), ("--output-len", args.output_len)):
        if not 1 <= lo <= hi:
            ap.error(f"{name} needs 1 <= MIN <= MAX, got {lo} {hi}")
    if args.threads < 1 or args.repeats < 1 or args.num_requests < 1:
        ap.error("--threads, --repeats and --num-requests must be positive")
    return args


def _fmt_rate(x: float) -> str:
    return f"{x:,.1f}"


def build_report(args: argparse.Namespace, results: dict[str, list[dict]], expected: int, cfg: dict,
                 command: str, date: str, machine: str, profile_text: str | None) -> str:
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "gen_cpu_s", "peak_rss_mib")}
           for side, runs in results.items()}
    rate = {side: expected / med[side]["wall_s"] for side in results}
    cpu_rate = {side: expected / med[side]["gen_cpu_s"] for side in results}
    refs = [s for s in REFERENCES if s in rate]
    best_ref = max(refs, key=lambda s: rate[s]) if refs else None
    n = cfg["num_requests"]
    out = ["## Engine vs transformers: `ops/bench/engine.py`", ""]
    out.append(f"- Command: `{command}`")
    out.append(f"- Date: {date}")
    out.append(f"- Machine: {machine}")
    out.append(f"- Checkpoint: preset `{cfg['preset']}` (seed {cfg['ckpt_seed']}), fp32, text path only")
    out.append(f"- Workload: {n} requests in arrival order (seed {cfg['seed']}), prompts "
               f"{cfg['prompt_len'][0]}..{cfg['prompt_len'][1]} tokens ({cfg['prompt_tokens']:,} in all), outputs "
               f"{cfg['output_len'][0]}..{cfg['output_len'][1]} tokens ({expected:,} useful output tokens in all); "
               f"greedy, EOS ignored on every side")
    out.append(f"- Engine config: max_num_seqs={cfg['engine']['max_num_seqs']}, max_num_batched_tokens="
               f"{cfg['engine']['max_num_batched_tokens']}, block_size={cfg['engine']['block_size']}, "
               f"num_kv_blocks={cfg['engine']['num_kv_blocks']} (the whole workload fits)")
    out.append(f"- Rounds: {args.repeats} (sides alternate within each round; medians reported)")
    out.append("")
    out.append("| side | output tokens/s | vs better reference | wall s | useful / computed output tokens "
               "| peak RSS MiB | child CPU s | generation CPU s | vs better reference by CPU s | detail |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    best_cpu_ref = max(refs, key=lambda s: cpu_rate[s]) if refs else None
    for side in SIDES:
        if side not in results:
            continue
        last = results[side][-1]
        ratio = f"{rate[side] / rate[best_ref]:.2f}x" if best_ref else "n/a"
        cpu_ratio = f"{cpu_rate[side] / cpu_rate[best_cpu_ref]:.2f}x" if best_cpu_ref else "n/a"
        label = LABELS[side].replace("all", f"all {n}") if side == "hf-all" else LABELS[side]
        out.append(f"| {label} | {_fmt_rate(rate[side])} | {ratio} | {med[side]['wall_s']:.1f} | "
                   f"{last['useful_tokens']:,} / {last['computed_tokens']:,} | {med[side]['peak_rss_mib']:,.0f} | "
                   f"{last['process_cpu_s']:.0f} | {med[side]['gen_cpu_s']:.1f} | {cpu_ratio} | "
                   f"{last.get('detail', '')} |")
    lat_rows = [(s, r[-1]["latency"]) for s, r in results.items() if r[-1].get("latency")]
    if lat_rows:
        lp, lo = lat_rows[0][1]["prompt_tokens"], lat_rows[0][1]["output_tokens"]
        out.append("")
        out.append(f"Batch-1 latency (one request alone, prompt {lp} tokens, {lo} output tokens, after the side's "
                   "throughput run in the same child):")
        out.append("")
        out.append("| side | time to first token ms | mean inter-token ms |")
        out.append("| --- | ---: | ---: |")
        names = {"engine": "engine (`LLMEngine.step` timing)",
                 "hf-batch8": "transformers (TTFT: generate 1 token; inter-token: (t(64) - t(1)) / 63)"}
        for side, lat in lat_rows:
            label = names.get(side, side).replace("64", str(lo)).replace("63", str(lo - 1))
            out.append(f"| {label} | {lat['ttft_s'] * 1e3:,.1f} | {lat['itl_s'] * 1e3:,.1f} |")
    out.append("")
    out.append("Notes:")
    if best_ref and "engine" in rate:
        ratio = rate["engine"] / rate[best_ref]
        verdict = "met" if ratio >= GOAL else "**missed**"
        cpu_ratio = cpu_rate["engine"] / max(cpu_rate[s] for s in refs)
        out.append(f"- Goal: {GOAL:g}x the better reference ({LABELS[best_ref]}). This run: {ratio:.2f}x, "
                   f"goal {verdict} ({cpu_ratio:.2f}x by generation CPU time).")
    out.append("- Output tokens/s counts useful tokens only: each request's own requested output length. A "
               "static batch generates the batch's longest requested length for every row (and pads prompts to "
               "the batch's longest); those extra tokens are computed (the \"computed\" count) but not counted.")
    out.append("- Wall time covers generation only: model load and a short warm-up generate in each child are "
               "excluded. Peak RSS is the child's `ru_maxrss`, load included.")
    out.append("- Generation CPU s is the child's CPU time over the same span, and the ratio beside it compares "
               "output tokens per CPU second: on a machine shared with other work it moves much less than wall "
               "time does (with --threads 1 it is the side's own work; with more threads it includes the "
               "threads' spin-waits).")
    out.append("- Sides run one after another in separate child processes on a shared machine; the load "
               "average above and each child's CPU seconds show how busy it was.")
    if profile_text:
        out.append("")
        out.append(f"Engine profile (`--profile`, {cfg['profile_steps']} steps of the same workload after "
                   f"{cfg['profile_skip']}; "
                   "cumulative times include callees):")
        out.append("")
        out.append("```text")
        out.append(profile_text)
        out.append("```")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return 0
    command = "python -m ops.bench.engine" + (" " + shlex.join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ckpt = args.ckpt_dir or Path.home() / ".cache" / "moe-cluster" / f"{args.preset}-seed{args.ckpt_seed}"
    ckpt = ensure_checkpoint(Path(ckpt).expanduser(), args.preset, args.ckpt_seed)
    config = json.loads((ckpt / "config.json").read_text())
    text = config.get("text_config", config)
    vocab, pad = text["vocab_size"], text.get("pad_token_id") or 0
    token_range = (min(TOKEN_LOW, vocab // 2), vocab - 1)
    work = make_workload(args.seed, args.num_requests, args.prompt_len, args.output_len, token_range)
    expected = sum(r.max_tokens for r in work)
    latency = None
    if args.latency[0] > 0 and args.latency[1] > 0:
        lat = fixed_request(args.seed + 1, args.latency[0], args.latency[1], token_range)
        latency = {"prompt": lat.prompt, "max_tokens": lat.max_tokens}
    bs = args.block_size
    blocks = sum(-(-(len(r.prompt) + r.max_tokens) // bs) for r in work) + args.num_requests + 16
    if latency:
        blocks = max(blocks, -(-(args.latency[0] + args.latency[1]) // bs) + 16)
    engine_cfg = {"max_num_seqs": args.num_requests, "max_num_batched_tokens": args.max_num_batched_tokens,
                  "block_size": bs, "num_kv_blocks": blocks}
    base = {"ckpt": str(ckpt), "threads": args.threads, "requests": [[r.prompt, r.max_tokens] for r in work],
            "pad_token_id": pad, "engine": engine_cfg,
            "profile": {"skip": args.profile_skip, "steps": args.profile_steps, "torch_steps": args.torch_profile_steps,
                        "top": args.profile_top}}
    machine = machine_line(args.threads)
    print(f"workload: {len(work)} requests, {sum(len(r.prompt) for r in work):,} prompt tokens, {expected:,} "
          f"output tokens; checkpoint {ckpt} ({args.preset}); {machine}", file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work_dir = Path(tmp)
        sides = [] if args.profile_only else args.sides
        for rnd in range(args.repeats):
            for side in sides:
                spec = {**base, "batch_size": 8 if side == "hf-batch8" else len(work),
                        "latency": latency if side in ("engine", "hf-batch8") and rnd == 0 else None}
                r = run_child(MODULE, side, spec, work_dir, args.threads, args.child_timeout)
                if r["useful_tokens"] != expected:
                    raise SystemExit(f"side {side!r} reports {r['useful_tokens']} useful output tokens; the workload "
                                     f"asks for {expected}")
                print(f"[{side}] round {rnd + 1}: {expected / r['wall_s']:.1f} output tokens/s "
                      f"({r['wall_s']:.1f} s), peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
                results.setdefault(side, []).append(r)
        profile_text = None
        if args.profile or args.profile_only:
            r = run_child(MODULE, "profile", {**base, "latency": None}, work_dir, args.threads, args.child_timeout)
            profile_text = r["profile_text"]
    import os

    machine += f"; at the end {os.getloadavg()[0]:.2f} (1 min)"
    cfg = {"preset": args.preset, "ckpt_seed": args.ckpt_seed, "seed": args.seed, "num_requests": len(work),
           "prompt_len": args.prompt_len, "output_len": args.output_len,
           "prompt_tokens": sum(len(r.prompt) for r in work), "engine": engine_cfg,
           "profile_steps": args.profile_steps, "profile_skip": args.profile_skip}
    if results:
        report = build_report(args, results, expected, cfg, command, date, machine, profile_text)
    else:
        report = f"Engine profile ({command}, {date}; {machine}):\n\n```text\n{profile_text}\n```\n"
    print(report)
    print(f"total {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    if args.write_docs and not results:
        print("--write-docs ignored: a profile alone does not replace the benchmark table", file=sys.stderr)
    elif args.write_docs:
        path = replace_section(SECTION, report)
        print(f"wrote the {SECTION!r} section of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
