"""The serving layers against the engine they wrap, on one Ray cluster with one EngineServer replica:

  handle   the EngineServer deployment called directly through a DeploymentHandle (streaming), from
           this process: the engine plus Serve's replica hop, no ingress, no proxy
  http     the OpenAI API: `POST /v1/completions` with `stream: true` through Serve's HTTP proxy
           and the Ingress deployment (SSE, `return_token_ids` to count tokens exactly)
  grpc     `moe_cluster.v1.MoeCluster/GenerateStream` through Serve's gRPC proxy and the Ingress

Closed-loop load: at each concurrency C, C clients each send a request, wait for its last token,
send the next, until the level's requests are done; the three paths run one after another at
each level (order rotated per level), over the same seeded requests (token-id prompts, greedy,
EOS ignored, so every path computes the same tokens). Per path: requests/s, output tokens/s,
time to first token and inter-token latency (p50, p99, from the client's arrival times), and the
CPU seconds each process of the cluster spent per 1000 output tokens (engine, ingress, proxies,
this client), which is where the time goes.

Then long-context interference, over HTTP: S streams decode; a prompt of L tokens arrives; the
streams' inter-token latency before it and while it is prefilled (chunked prefill: one chunk per
engine step, beside the decodes, under the engine's `target_step_ms`); then the streams stop and
another prompt of L tokens runs alone, for its time to first token without decodes (its own
section in docs/BENCHMARKS.md).

    python -m ops.bench.serve --smoke         # tiny checkpoint, under a minute (the test suite runs this)
    python -m ops.bench.serve --write-docs    # the full run (bench checkpoint); refreshes docs/BENCHMARKS.md
    python -m ops.bench.serve --interference-only --target-step-ms 700 --write-docs   # that part alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import (
    default_ckpt_dir,
    ensure_checkpoint,
    fixed_request,
    machine_line,
    make_workload,
    replace_section,
)

SECTION = "serve"
INTERFERENCE_SECTION = "serve-interference"
APP = "bench"
PATHS = ("handle", "http", "grpc")
TOKEN_LOW = 1000  # random prompt ids from here to the top of the vocabulary: no control tokens
VOCAB = 131072
GOAL_HTTP_RATIO = 0.8  # HTTP output tokens/s at the highest concurrency / the direct handle's
GOAL_INTERFERENCE = 2.0  # the long prompt may at most double the others' inter-token p99
GOAL_TTFT = 1.5  # its time to first token among the streams, at most this times its TTFT alone
_T_START = time.perf_counter()


# -- measurements --------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request as the client saw it: send time and each token's arrival time."""

    sent: float
    stamps: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def gaps(samples: list[Sample]) -> list[float]:
    return [b - a for s in samples for a, b in zip(s.stamps, s.stamps[1:], strict=False)]


@dataclass
class LevelResult:
    path: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft: list[float]
    itl: list[float]
    cpu: dict[str, float]  # CPU seconds per process group during the level
    load: list[float] = field(default_factory=list)  # the machine's 1-minute load average at the end

    def add(self, other: LevelResult) -> LevelResult:
        """Two rounds of the same path and concurrency as one: totals over total wall time."""
        cpu = {k: self.cpu.get(k, 0.0) + other.cpu.get(k, 0.0) for k in set(self.cpu) | set(other.cpu)}
        return LevelResult(self.path, self.concurrency, self.requests + other.requests, self.tokens + other.tokens,
                           self.wall_s + other.wall_s, self.ttft + other.ttft, self.itl + other.itl, cpu,
                           self.load + other.load)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s


# -- CPU accounting: the processes of this Ray cluster (descendants of this one) ------------------


def _proc_table() -> dict[int, tuple[int, str, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _group(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "client"
    for key, name in ((":EngineServer", "engine"), (":Ingress", "ingress"), ("ProxyActor", "proxy"),
                      ("ServeController", "controller")):
        if key in cmd:
            return name
    return "ray"


def cluster_cpu() -> dict[str, float]:
    """CPU seconds so far of this process and its descendants, by group."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in table:
            _, cmd, cpu = table[pid]
            group = _group(pid, cmd)
            out[group] = out.get(group, 0.0) + cpu
        todo.extend(children.get(pid, ()))
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: max(after.get(k, 0.0) - before.get(k, 0.0), 0.0) for k in set(before) | set(after)}


# -- the three clients ---------------------------------------------------------------------------


class Clients:
    def __init__(self, http_port: int, grpc_port: int) -> None:
        self.http_url = f"http://127.0.0.1:{http_port}/v1/completions"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self._session = None
        self._channel = None
        self._stub = None
        self._engine = None  # DeploymentHandle of the EngineServer deployment
        self._n = 0

    async def open(self) -> None:
        import aiohttp
        import grpc
        from ray import serve

        from deployments.app import ENGINE_DEPLOYMENT
        from deployments.protos import moe_cluster_pb2_grpc as pbg

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))
        self._channel = grpc.aio.insecure_channel(self.grpc_target)
        self._stub = pbg.MoeClusterStub(self._channel)
        self._engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP)

    async def close(self) -> None:
        await self._session.close()
        await self._channel.close()

    async def run(self, path: str, prompt: list[int], max_tokens: int, stop: asyncio.Event | None = None) -> Sample:
        return await getattr(self, f"_{path}")(prompt, max_tokens, stop)

    async def _handle(self, prompt: list[int], max_tokens: int, stop: asyncio.Event | None) -> Sample:
        from cluster.engine.sampling_params import SamplingParams
        from deployments.serving.request import GenerateRequest

        self._n += 1
        req = GenerateRequest(f"bench-{os.getpid()}-{self._n}", tuple(prompt),
                              SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        sample = Sample(time.perf_counter())
        gen = self._engine.options(stream=True).generate.remote(req)
        try:
            async for out in gen:
                now = time.perf_counter()
                sample.stamps.extend([now] * len(out.new_token_ids))
                if stop is not None and stop.is_set():
                    break
        finally:
            gen.cancel()
        return sample

    async def _http(self, prompt: list[int], max_tokens: int, stop: asyncio.Event | None) -> Sample:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        sample = Sample(time.perf_counter())
        async with self._session.post(self.http_url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    now = time.perf_counter()
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {chunk['error']}")
                    for choice in chunk["choices"]:
                        sample.stamps.extend([now] * len(choice.get("token_ids") or ()))
                    if stop is not None and stop.is_set():
                        break
        return sample

    async def _grpc(self, prompt: list[int], max_tokens: int, stop: asyncio.Event | None) -> Sample:
        from deployments.protos import moe_cluster_pb2 as pb

        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(
            max_tokens=max_tokens, temperature=0, ignore_eos=True))
        sample = Sample(time.perf_counter())
        call = self._stub.GenerateStream(req, metadata=[("application", APP)])
        try:
            async for msg in call:
                now = time.perf_counter()
                sample.stamps.extend([now] * len(msg.token_ids))
                if stop is not None and stop.is_set():
                    break
        finally:
            call.cancel()
        return sample


async def closed_loop(clients: Clients, path: str, concurrency: int, requests: list) -> LevelResult:
    queue = list(enumerate(requests))
    samples: list[Sample | None] = [None] * len(requests)

    async def worker() -> None:
        while queue:
            i, req = queue.pop(0)
            samples[i] = await clients.run(path, req.prompt, req.max_tokens)

    cpu0 = cluster_cpu()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = cpu_delta(cpu0, cluster_cpu())
    done = [s for s in samples if s is not None]
    for s, req in zip(done, requests, strict=True):
        if len(s.stamps) != req.max_tokens:
            raise SystemExit(f"{path}: a request got {len(s.stamps)} tokens, asked for {req.max_tokens}")
    return LevelResult(path, concurrency, len(done), sum(len(s.stamps) for s in done), wall,
                       [s.stamps[0] - s.sent for s in done], gaps(done), cpu, [os.getloadavg()[0]])


async def interference(clients: Clients, streams: int, prompt_len: int, before_s: float, seed: int) -> dict:
    """S streams decode over HTTP; a prompt of L tokens arrives; their gaps before and during its prefill."""
    stop = asyncio.Event()
    prompts = make_workload(seed + 7, streams, (48, 64), (1, 1), (TOKEN_LOW, VOCAB - 1))
    live = [Sample(time.perf_counter()) for _ in prompts]
    tasks = [asyncio.ensure_future(_stream_into(clients, p.prompt, stop, s))
             for p, s in zip(prompts, live, strict=True)]
    try:
        deadline = time.perf_counter() + 600
        while min(len(s.stamps) for s in live) < 3:  # every stream decoding
            if time.perf_counter() > deadline or any(t.done() for t in tasks):
                raise SystemExit("interference: the streams did not start")
            await asyncio.sleep(0.05)
        t_before = time.perf_counter()
        await asyncio.sleep(before_s)
        long_prompt = fixed_request(seed + 11, prompt_len, 1, (TOKEN_LOW, VOCAB - 1)).prompt
        cpu0 = cluster_cpu()
        loads = [os.getloadavg()[0]]
        t_send = time.perf_counter()
        long_task = asyncio.ensure_future(clients.run("http", long_prompt, 1))
        while not long_task.done():  # the machine's load while it is prefilled
            await asyncio.wait([long_task], timeout=5.0)
            loads.append(os.getloadavg()[0])
        t_first = long_task.result().stamps[0]
        cpu = cpu_delta(cpu0, cluster_cpu())
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(2.0)  # the streams' aborts reach the engine
    # Alone: another prompt of the same length (not the first one's: no prefix cache hit), no decodes.
    alone_prompt = fixed_request(seed + 13, prompt_len, 1, (TOKEN_LOW, VOCAB - 1)).prompt
    alone = await clients.run("http", alone_prompt, 1)

    def window(lo: float, hi: float) -> list[float]:
        return [b - a for s in live for a, b in zip(s.stamps, s.stamps[1:], strict=False) if lo < b <= hi]

    before, during = window(t_before, t_send), window(t_send, t_first)
    per_stream = [sum(1 for t in s.stamps if t_send < t <= t_first) for s in live]
    return {"streams": streams, "prompt_len": prompt_len, "before": before, "during": during,
            "before_s": t_send - t_before, "prefill_s": t_first - t_send, "cpu": cpu, "loads": loads,
            "tokens_during": per_stream, "alone_s": alone.stamps[0] - alone.sent}


async def _stream_into(clients: Clients, prompt: list[int], stop: asyncio.Event, sample: Sample) -> None:
    """A long HTTP stream whose arrival times land in `sample` as they come."""
    body = {"prompt": prompt, "max_tokens": 4096, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    async with clients._session.post(clients.http_url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if stop.is_set():
                return
            if line.startswith(b"data: {"):
                now = time.perf_counter()
                for choice in json.loads(line[6:]).get("choices", ()):
                    sample.stamps.extend([now] * len(choice.get("token_ids") or ()))


# -- the cluster ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(args: argparse.Namespace, ckpt: Path):  # noqa: ANN201 - the AppConfig
    from deployments import launch
    from deployments.config import AppConfig

    config = AppConfig(
        model=str(ckpt), app_name=APP, http_port=free_port(), grpc_port=free_port(),
        ingress_num_cpus=0, engine_num_cpus=0, vision={"num_replicas": 0},
        max_ongoing_requests=256, max_queued_requests=256, max_tokens=4096,
        engine={"max_num_batched_tokens": args.max_num_batched_tokens, "target_step_ms": args.target_step_ms,
                "min_prefill_tokens": args.min_prefill_tokens,
                "max_num_seqs": max(max(args.concurrency), args.long_streams + 1)})
    launch.start_ray_and_serve(config, num_cpus=os.cpu_count() or 2)
    launch.deploy([config])
    return config


# -- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, config) -> dict:  # noqa: ANN001
    clients = Clients(config.http_port, config.grpc_port)
    await clients.open()
    try:
        warm = make_workload(args.seed + 1, 2, (16, 16), (4, 4), (TOKEN_LOW, VOCAB - 1))
        for path in PATHS:  # first calls build connections, handles and caches
            for req in warm:
                await clients.run(path, req.prompt, req.max_tokens)
        levels: list[LevelResult] = []
        for li, c in enumerate([] if args.interference_only else args.concurrency):
            n = max(args.min_requests, c * args.requests_per_client)
            merged: dict[str, LevelResult] = {}
            for rnd in range(args.rounds):  # paths interleaved, order rotated: slow drifts hit all alike
                reqs = make_workload(args.seed + 1000 * rnd + c, n, tuple(args.prompt_len), tuple(args.output_len),
                                     (TOKEN_LOW, VOCAB - 1))
                k = (li + rnd) % 3
                for path in PATHS[k:] + PATHS[:k]:
                    res = await closed_loop(clients, path, c, reqs)
                    merged[path] = merged[path].add(res) if path in merged else res
                    _progress(f"c={c:>3} {path:<6} round {rnd + 1}: {res.rps:7.2f} req/s {res.tps:8.1f} tok/s "
                              f"ttft p50 {percentile(res.ttft, 50) * 1e3:8.1f} ms  itl p50 "
                              f"{percentile(res.itl, 50) * 1e3:7.1f} ms ({n} requests, {res.wall_s:.1f} s)")
            levels += [merged[p] for p in PATHS]
        inter = None
        if args.long_prompt > 0:
            inter = await interference(clients, args.long_streams, args.long_prompt, args.before_s, args.seed)
            _progress(f"interference: {len(inter['before'])} gaps before, {len(inter['during'])} during, "
                      f"prefill {inter['prefill_s']:.1f} s, alone {inter['alone_s']:.1f} s")
        return {"levels": levels, "interference": inter}
    finally:
        await clients.close()


def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T_START:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:,.1f}"


def _cpu_line(cpu: dict[str, float], tokens: int) -> str:
    per = 1000.0 / max(tokens, 1)
    keys = ("engine", "ingress", "proxy", "client", "controller", "ray")
    return ", ".join(f"{k} {cpu.get(k, 0.0) * per:.2f}" for k in keys if cpu.get(k, 0.0) * per >= 0.005)


def build_report(args: argparse.Namespace, result: dict, ckpt: Path, command: str, wall_s: float) -> str:
    levels: list[LevelResult] = result["levels"]
    by = {(r.path, r.concurrency): r for r in levels}
    lines = [
        "## Serving layers: HTTP and gRPC against the EngineServer deployment called directly",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {machine_line(os.cpu_count() or 2)}; "
        f"the whole run took {wall_s:.0f} s.",
        "",
        f"Checkpoint `{ckpt.name}` ({args.preset}), fp32 on CPUs; one Ray cluster on this machine, one Ingress and one "
        f"EngineServer replica (engine: {args.max_num_batched_tokens}-token steps), this process as the client of all "
        "three paths. Closed loop: at each concurrency C, C clients send requests back to back; "
        f"{args.rounds} round(s) per level, the paths one after another in each (order rotated), "
        f"{args.requests_per_client} request(s) per client per round (at least {args.min_requests}), prompts "
        f"{args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs {args.output_len[0]}-{args.output_len[1]} tokens "
        "(greedy, EOS ignored), the same seeded requests on every path. TTFT and inter-token latency (ITL) are "
        "the client's arrival times. The counts are small so that the whole run stays under 15 minutes on a "
        "2-core machine (p99 is then close to the maximum); the machine is shared, so compare the paths within a "
        "level, not runs.",
        "",
        "| C | path | requests/s | output tokens/s | vs handle | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
        "| ITL p99 (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in args.concurrency:
        base = by.get(("handle", c))
        for path in PATHS:
            r = by.get((path, c))
            if r is None:
                continue
            ratio = f"{r.tps / base.tps:.2f}x" if base else "-"
            lines.append(f"| {c} | {path} | {r.rps:,.2f} | {r.tps:,.1f} | {ratio} | {_ms(percentile(r.ttft, 50))} | "
                         f"{_ms(percentile(r.ttft, 99))} | {_ms(percentile(r.itl, 50))} | "
                         f"{_ms(percentile(r.itl, 99))} |")
    lines += ["", "CPU seconds per 1000 output tokens, by process (where the time goes), and the machine's "
              "1-minute load average at the end of each round (this machine is shared: other jobs' load shows "
              "there):", "", "| C | path | CPU s / 1000 tokens | load average |", "|---:|---|---|---:|"]
    for r in levels:
        load = " / ".join(f"{x:.1f}" for x in r.load)
        lines.append(f"| {r.concurrency} | {r.path} | {_cpu_line(r.cpu, r.tokens)} | {load} |")
    top = max(args.concurrency)
    http, handle = by.get(("http", top)), by.get(("handle", top))
    if http and handle:
        ratio = http.tps / handle.tps
        verdict = "met" if ratio >= GOAL_HTTP_RATIO else "missed"
        lines += ["", f"Goal: HTTP output tokens/s at concurrency {top} at least {GOAL_HTTP_RATIO}x the direct handle: "
                      f"**{ratio:.2f}x, {verdict}**."]
        if verdict == "missed":
            per = 1000.0 / max(http.tokens, 1)
            extra = {k: http.cpu.get(k, 0.0) * per - handle.cpu.get(k, 0.0) * 1000.0 / max(handle.tokens, 1)
                     for k in ("ingress", "proxy", "client", "engine")}
            lines.append("The HTTP path spends more CPU per 1000 tokens than the handle path in: "
                         + ", ".join(f"{k} +{v:.2f} s" for k, v in extra.items() if v > 0.005)
                         + " (all processes share this machine's cores with the engine).")
    for note in args.notes:
        lines += ["", note]
    return "\n".join(lines)


def interference_report(args: argparse.Namespace, inter: dict, ckpt: Path, command: str) -> str:
    b99, d99 = percentile(inter["before"], 99), percentile(inter["during"], 99)
    during_tokens, loads = inter["tokens_during"] or [0], inter["loads"]
    ratio = d99 / b99 if b99 else float("nan")
    verdict = "met" if ratio <= GOAL_INTERFERENCE else "missed"
    ttft_ratio = inter["prefill_s"] / inter["alone_s"]
    ttft_verdict = "met" if ttft_ratio <= GOAL_TTFT else "missed"
    budget = (f"`target_step_ms` {args.target_step_ms:g} (a prefill budget per step learnt from measured step times, "
              f"at least {args.min_prefill_tokens} prompt tokens a step)" if args.target_step_ms else
              "no `target_step_ms` (prefill chunks take what the decodes leave of the token cap)")
    lines = [
        f"## Long-context interference: a {inter['prompt_len']:,}-token prompt while {inter['streams']} streams "
        "decode (HTTP)",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {machine_line(os.cpu_count() or 2)}. "
        f"Checkpoint `{ckpt.name}` ({args.preset}), fp32 on CPUs, one EngineServer replica: "
        f"{args.max_num_batched_tokens}-token steps, {budget}; decodes go first in every step.",
        "",
        f"The streams decoded for {inter['before_s']:.1f} s before the long prompt arrived; it took "
        f"{inter['prefill_s']:.1f} s to its first token, during which each stream received "
        f"{min(during_tokens)}-{max(during_tokens)} tokens (a token per step: no stream stalled). Then the streams "
        f"stopped and another {inter['prompt_len']:,}-token prompt ran alone (same engine and settings, no decodes): "
        f"{inter['alone_s']:.1f} s to its first token. The machine's 1-minute load average during the long prefill: "
        f"{min(loads):.1f} to {max(loads):.1f}.",
        "",
        "| the others' inter-token latency | gaps | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---:|---:|---:|---:|",
        f"| before | {len(inter['before'])} | {_ms(percentile(inter['before'], 50))} | {_ms(b99)} | "
        f"{_ms(max(inter['before'], default=float('nan')))} |",
        f"| during the long prefill | {len(inter['during'])} | {_ms(percentile(inter['during'], 50))} | "
        f"{_ms(d99)} | {_ms(max(inter['during'], default=float('nan')))} |",
        "",
        "| the long prompt's time to first token | s |",
        "|---|---:|",
        f"| among the {inter['streams']} streams | {inter['prefill_s']:.1f} |",
        f"| alone | {inter['alone_s']:.1f} |",
        "",
        f"Goals: the long prompt at most doubles the others' inter-token p99: **{ratio:.2f}x, {verdict}**; its time "
        f"to first token within {GOAL_TTFT}x of running alone: **{ttft_ratio:.2f}x, {ttft_verdict}**.",
    ]
    for note in args.notes:
        lines += ["", note]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, small counts: seconds to a minute")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="default: the cached preset checkpoint")
    ap.add_argument("--preset", default=None, help="default: bench (tiny with --smoke)")
    ap.add_argument("--ckpt-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the workload")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default: 1 8 32 64 (1 4 smoke)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per level, paths interleaved; default: 2 (1 "
                                                             "smoke)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="per round; default: 1")
    ap.add_argument("--min-requests", type=int, default=None, help="per round; default: 3")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=None, help="default: 32 96 (8 24 smoke)")
    ap.add_argument("--output-len", type=int, nargs=2, default=None, help="default: 16 32 (4 8 smoke)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 512 (64 smoke)")
    ap.add_argument("--long-prompt", type=int, default=None, help="tokens; 0 skips it; default: 16384 (400 smoke)")
    ap.add_argument("--long-streams", type=int, default=None, help="default: 32 (4 smoke)")
    ap.add_argument("--before-s", type=float, default=None, help="default: 8 (1 smoke)")
    ap.add_argument("--target-step-ms", type=float, default=None,
                    help="the engine's step-time target (its prefill budget per step); default: none")
    ap.add_argument("--min-prefill-tokens", type=int, default=32, help="the engine's least prefill a step")
    ap.add_argument("--interference-only", action="store_true",
                    help="skip the concurrency levels: the long-context interference alone (its own docs section)")
    ap.add_argument("--note", dest="notes", action="append", default=[], help="a line added under the table")
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "preset": "tiny" if smoke else "bench", "concurrency": [1, 4] if smoke else [1, 8, 32, 64],
        "rounds": 1 if smoke else 2, "requests_per_client": 1, "min_requests": 3,
        "prompt_len": [8, 24] if smoke else [32, 96], "output_len": [4, 8] if smoke else [16, 32],
        "max_num_batched_tokens": 64 if smoke else 512, "long_prompt": 400 if smoke else 16384,
        "long_streams": 4 if smoke else 32, "before_s": 1.0 if smoke else 8.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt = args.ckpt_dir or default_ckpt_dir(args.preset, args.ckpt_seed)
    ensure_checkpoint(ckpt, args.preset, args.ckpt_seed)
    command = "python -m ops.bench.serve " + shlex.join(argv if argv is not None else sys.argv[1:])
    from deployments import launch

    config = start_cluster(args, ckpt)
    try:
        _progress(f"cluster up: {ckpt} on HTTP {config.http_port}, gRPC {config.grpc_port}")
        result = asyncio.run(run(args, config))
    finally:
        launch.stop()
    sections = []
    if result["levels"]:
        sections.append((SECTION, build_report(args, result, ckpt, command.strip(), time.perf_counter() - _T_START)))
    if result["interference"]:
        sections.append((INTERFERENCE_SECTION, interference_report(args, result["interference"], ckpt,
                                                                   command.strip())))
    for name, report in sections:
        print(report)
        if args.write_docs:
            print(f"wrote {replace_section(name, report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
