"""Expert parallelism against the in-process engine: an engine with 2 expert shards on separate
Ray nodes (a local `ray.cluster_utils.Cluster`, one `expert_slot` per worker node), for each
distributed transport, in one run, on the same checkpoint.

Rows: decode output tokens/s at batch 1, 16 and 64 (short prompts), a prefill-heavy mix, and the
per-layer exchange round trip (p50, p99) at 1, 16 and 64 tokens, each as a multiple of an OS
pipe round trip of the same bytes between two processes measured in the same run.

    python -m ops.bench.ep --smoke          # tiny checkpoint (the test suite runs this)
    python -m ops.bench.ep --write-docs     # the full run on the bench preset
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import default_ckpt_dir, ensure_checkpoint, machine_line, make_workload, replace_section

SECTION = "ep"
TRANSPORTS = ("deepspeed", "ray")
TOKEN_RANGE = (1000, 131071)


def _echo(conn) -> None:
    while True:
        msg = conn.recv_bytes()
        if not msg:
            return
        conn.send_bytes(msg[: len(msg) // 2] if len(msg) > 1 else msg)


def pipe_round_trip(send_bytes: int, recv_bytes: int, repeats: int) -> list[float]:
    """Seconds per round trip through an OS pipe to another process: `send_bytes` out, about
    `recv_bytes` back (the echo returns half, matching dispatch rows in, partial sums out)."""
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    payload = b"x" * max(send_bytes, 2 * recv_bytes, 2)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        parent.send_bytes(payload)
        parent.recv_bytes()
        times.append(time.perf_counter() - start)
    parent.send_bytes(b"")
    proc.join(timeout=5)
    return times[2:]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _throughput(llm, reqs, sampling) -> float:
    prompts = [r.prompt for r in reqs]
    params = [sampling(r.max_tokens) for r in reqs]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outs)
    if produced != sum(r.max_tokens for r in reqs):
        raise SystemExit(f"expected {sum(r.max_tokens for r in reqs)} output tokens, got {produced}")
    return produced / elapsed


def run(args: argparse.Namespace) -> str:
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from cluster import LLM, SamplingParams
    from cluster.experts.group import time_dispatch

    torch.set_num_threads(args.threads)
    preset = "tiny" if args.smoke else args.preset
    ckpt = args.ckpt_dir or default_ckpt_dir(preset, 0)
    ensure_checkpoint(ckpt, preset, 0)
    batches = (1, 4) if args.smoke else (1, 16, 64)
    out_tokens = 4 if args.smoke else args.decode_tokens
    exchange_tokens = (1, 16) if args.smoke else (1, 16, 64)
    repeats = 5 if args.smoke else args.repeats

    def sampling(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    workloads = {f"decode, batch {b}": make_workload(args.seed + b, b, (16, 32), (out_tokens, out_tokens),
                                                     TOKEN_RANGE) for b in batches}
    prefill = (2, (64, 128), 2) if args.smoke else (16, (384, 768), 8)
    workloads["prefill-heavy mix"] = make_workload(args.seed, prefill[0], prefill[1], (prefill[2], prefill[2]),
                                                   TOKEN_RANGE)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2 * len(TRANSPORTS)):  # both groups stay up so that sides alternate per row
        cluster.add_node(num_cpus=1, resources={"expert_slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    rates: dict[str, dict[str, float]] = {}
    exchange: dict[str, dict[int, list[float]]] = {}
    try:
        local = LLM(ckpt, max_num_batched_tokens=2048)
        sides = {"in-process": local}
        for transport in TRANSPORTS:
            print(f"starting the {transport} group ...", file=sys.stderr, flush=True)
            sides[transport] = LLM(ckpt, transport=transport, num_expert_shards=2, max_num_batched_tokens=2048)
        for name, reqs in workloads.items():
            for side, llm in sides.items():  # sides alternate within each row
                _throughput(llm, reqs[:1], sampling)  # warm-up
                rates.setdefault(name, {})[side] = _throughput(llm, reqs, sampling)
                print(f"{name:>20} {side:>10}: {rates[name][side]:.1f} tok/s", file=sys.stderr, flush=True)
        for transport in TRANSPORTS:
            engine = sides[transport].group.engine
            exchange[transport] = {t: ray.get(engine.time_exchange.remote(t, repeats)) for t in exchange_tokens}
        in_process = {t: time_dispatch(local.engine, t, repeats) for t in exchange_tokens}
        text = local.engine.text
        for transport in TRANSPORTS:
            sides[transport].close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    width = text.hidden_size + 2 * text.num_experts_per_tok
    pipes = {t: pipe_round_trip(t * width * 4, t * text.hidden_size * 4, repeats) for t in exchange_tokens}
    return _table(args, preset, rates, exchange, in_process, pipes)


def _table(args, preset, rates, exchange, in_process, pipes) -> str:
    lines = [f"Command: `{shlex.join(['python', '-m', 'ops.bench.ep', *sys.argv[1:]])}`  ",
             f"Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, checkpoint preset `{preset}`, "
             f"{machine_line(args.threads)}; 2 shards on 2 Ray nodes of one machine.", "",
             "| workload | in-process tok/s | deepspeed tok/s (x in-process) | ray tok/s (x in-process) |",
             "|---|---|---|---|"]
    for name, row in rates.items():
        base = row["in-process"]
        cells = [f"{row[t]:.1f} ({row[t] / base:.2f}x)" for t in TRANSPORTS]
        lines.append(f"| {name} | {base:.1f} | {' | '.join(cells)} |")
    # In-process: the same call through the LocalDispatcher, i.e. the experts' compute with no
    # transport; "beyond" is a transport's p50 less that, in pipe round trips.
    lines += ["", "| exchange tokens | pipe p50 (us) | in-process p50 (us) | " + " | ".join(
        f"{t} p50 / p99 (us; x pipe p50; beyond in-process, x pipe p50)" for t in TRANSPORTS) + " |",
        "|---|---|---|" + "---|" * len(TRANSPORTS)]
    for t, pipe in pipes.items():
        p, local = statistics.median(pipe), _pct(in_process[t], .5)
        cells = [f"{_pct(exchange[tr][t], .5) * 1e6:.0f} / {_pct(exchange[tr][t], .99) * 1e6:.0f} "
                 f"({_pct(exchange[tr][t], .5) / p:.1f}x; {(_pct(exchange[tr][t], .5) - local) / p:.1f}x)"
                 for tr in TRANSPORTS]
        lines.append(f"| {t} | {p * 1e6:.0f} | {local * 1e6:.0f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, small batches (seconds)")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    ap.add_argument("--preset", default="bench", help="checkpoint preset for the full run (default bench)")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint directory (default: the cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--decode-tokens", type=int, default=16, help="output tokens per decode request")
    ap.add_argument("--repeats", type=int, default=50, help="exchange round trips per size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    table = run(args)
    print(table)
    if args.write_docs:
        replace_section(SECTION, "## Expert parallelism (`ops/bench/ep.py`)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
