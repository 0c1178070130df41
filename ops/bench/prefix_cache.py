"""Prefix caching: the time to first token of requests that share a long system prompt, the
first (nothing cached) against the later ones (the system prompt's blocks cached), with caching
on, beside the same requests with caching off, in one process, alternating.

  python -m ops.bench.prefix_cache --write-docs   # a 2,048-token system prompt, `bench` preset
  python -m ops.bench.prefix_cache --smoke        # tiny checkpoint, a 256-token prompt: seconds (the suite runs this)

Every request is the shared system prompt and a user part of its own (`--user-len` tokens),
sent alone (one at a time, so nothing else is in its steps), greedy, one output token: the time
from `add_request` to the first token is its TTFT (wall and this process's CPU time). Both sides
must give the same first token to every request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ops.bench.common import (
    cpu_seconds,
    default_ckpt_dir,
    ensure_checkpoint,
    fixed_request,
    machine_line,
    replace_section,
)

SECTION = "prefix-cache"
GOAL = 0.2  # later requests' TTFT / the first's, from the issue: a fifth or less
TOKEN_RANGE = (1000, 100_000)
SIDES = ("caching on", "caching off")


def _ttft(engine: Any, rid: str, prompt: list[int]) -> dict:
    from cluster import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    engine.add_request(rid, prompt, params)
    first: list[int] = []
    cached = 0
    while not first:
        for out in engine.step():
            if out.request_id == rid and out.new_token_ids:
                first = list(out.new_token_ids)
                cached = out.num_cached_tokens or 0
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    while engine.has_unfinished():
        engine.step()
    engine.check_integrity()
    return {"wall": wall, "cpu": cpu, "token": first[0], "cached": cached}


def measure(args: argparse.Namespace, ckpt: Path) -> dict[str, list[dict]]:
    from cluster import LLM

    system = fixed_request(0, args.system_len, 1, TOKEN_RANGE).prompt
    users = [fixed_request(1 + i, args.user_len, 1, TOKEN_RANGE).prompt for i in range(args.requests)]
    total = args.system_len + args.user_len + 8
    engines = {side: LLM(ckpt, max_model_len=total, num_kv_blocks=4 * (total // 16 + 1) * 2,
                         enable_prefix_caching=side == "caching on").engine for side in SIDES}
    warm = fixed_request(99, 32, 1, TOKEN_RANGE).prompt  # a first step for each (lazy inits), shares nothing
    for side, engine in engines.items():
        _ttft(engine, f"warm-{side}", warm)
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for i, user in enumerate(users):
        order = SIDES if i % 2 == 0 else tuple(reversed(SIDES))
        for side in order:
            results[side].append(_ttft(engines[side], f"r{i}", system + user))
    for i in range(args.requests):
        on, off = results["caching on"][i]["token"], results["caching off"][i]["token"]
        if on != off:
            raise SystemExit(f"request {i}: first token {on} with caching, {off} without")
    for engine in engines.values():
        engine.close()
    return results


def report(args: argparse.Namespace, results: dict[str, list[dict]], elapsed: float) -> str:
    command = "python -m ops.bench.prefix_cache" + (" --smoke" if args.smoke else "") + \
        (" --write-docs" if args.write_docs else "")
    lines = [
        "## Prefix caching, a shared system prompt: `ops/bench/prefix_cache.py`",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine_line(1)}",
        f"- Checkpoint: preset `{args.preset}` (seed 0), fp32; engine defaults (16-token blocks, "
        "512-token steps)",
        f"- Workload: {args.requests} requests, each a {args.system_len:,}-token system prompt (the same for all) "
        f"and {args.user_len} tokens of its own, one at a time, greedy, 1 output token; both sides alternate "
        "request by request in one process; the first tokens agree on every request",
        "",
        "| side | first request TTFT (ms, wall / CPU) | later requests TTFT, median (ms, wall / CPU) | "
        "later / first (wall / CPU) | cached tokens, later requests |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    ratios = {}
    for side in SIDES:
        rows = results[side]
        first, later = rows[0], rows[1:]
        wall = statistics.median(r["wall"] for r in later)
        cpu = statistics.median(r["cpu"] for r in later)
        ratios[side] = (wall / first["wall"], cpu / first["cpu"])
        cached = sorted({r["cached"] for r in later})
        lines.append(f"| {side} | {first['wall'] * 1e3:,.1f} / {first['cpu'] * 1e3:,.1f} | {wall * 1e3:,.1f} / "
                     f"{cpu * 1e3:,.1f} | {ratios[side][0]:.3f} / {ratios[side][1]:.3f} | "
                     f"{', '.join(f'{c:,}' for c in cached)} |")
    met = "met" if ratios["caching on"][0] <= GOAL else "missed"
    lines += ["", f"Goal: later requests' TTFT at most {GOAL:g}x the first's with caching on: {met} "
              f"({ratios['caching on'][0]:.3f}x wall). With caching off every request prefills the whole prompt "
              f"({ratios['caching off'][0]:.2f}x). Run took {elapsed:.0f} s."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, a short system prompt: seconds")
    ap.add_argument("--preset", default=None, help="default: bench (tiny with --smoke)")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint directory (written when missing)")
    ap.add_argument("--system-len", type=int, default=None, help="default: 2048 (256 with --smoke)")
    ap.add_argument("--user-len", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="default: 8 (3 with --smoke)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-docs", action="store_true", help="write the section of docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "bench")
    args.system_len = args.system_len or (256 if args.smoke else 2048)
    args.requests = args.requests or (3 if args.smoke else 8)
    if args.requests < 2:
        ap.error("--requests: at least 2 (a first and a later one)")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ckpt = ensure_checkpoint(args.ckpt_dir or default_ckpt_dir(args.preset, 0), args.preset, 0)
    results = measure(args, ckpt)
    text = report(args, results, time.perf_counter() - started)
    print(text)
    if args.write_docs:
        print(f"wrote {replace_section(SECTION, text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
