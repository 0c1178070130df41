"""256K tokens served: one request with a 262,144-token prompt through `moe-cluster serve` on the
`long` preset (262,656 positions by YaRN, one layer, one head), streamed over HTTP.

`moe-cluster serve` runs in its own process group with a config file written here; the request is
`POST /v1/completions` with token ids, `stream: true` and `return_token_ids`. While it runs, the
engine's KV accounting (`/v1/engine/stats`: blocks used at their most, blocks in the pool) is
polled, and afterwards the engine replica's process is read for its peak resident memory (Linux
`VmHWM`, beside its `VmRSS` before the request). Recorded: time to first token (the prefill),
the answer's inter-token latency, KV blocks and bytes, and that memory.

    python -m ops.bench.long_context --smoke        # a 16K-token prompt, the same path (the test suite runs this)
    python -m ops.bench.long_context --write-docs   # the 262,144-token prompt; refreshes docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import (
    REPO_ROOT,
    default_ckpt_dir,
    ensure_checkpoint,
    fixed_request,
    machine_line,
    replace_section,
)

SECTION = "long-context"
PRESET = "long"
TOKEN_RANGE = (1000, 131071)  # no control tokens
START_TIMEOUT_S = 300.0
BLOCK_SIZE = 16
_T_START = time.perf_counter()


@dataclass
class Stream:
    """The request as the client saw it: send time, each token's arrival, the ids."""

    sent: float
    stamps: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T_START:7.1f} s] {msg}", file=sys.stderr, flush=True)


# -- the server ------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args: argparse.Namespace, ckpt: Path, config_path: Path, http_port: int,
                  grpc_port: int) -> list[str]:
    return ["serve", "--model", str(ckpt), "--config", str(config_path), "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--num-cpus", str(args.num_cpus)]


def write_config(args: argparse.Namespace, path: Path) -> dict:
    engine = {"block_size": BLOCK_SIZE, "max_num_batched_tokens": args.chunk, "kv_cache_bytes": args.kv_cache_bytes}
    config = {"engine": engine, "vision": {"num_replicas": 0}, "ingress_num_cpus": 0, "engine_num_cpus": 0,
              "max_tokens": args.max_tokens, "max_body_bytes": 32 * 2**20}
    path.write_text(json.dumps(config, indent=2))
    return config


class Server:
    """`moe-cluster serve` in its own process group; its output collected line by line."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)  # its own local cluster, never another one
        self.proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", *argv], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Press Ctrl-C" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout_s: float) -> None:
        if not self._ready.wait(timeout_s) or self.proc.poll() is not None:
            raise SystemExit(f"moe-cluster serve did not start in {timeout_s:.0f} s:\n{''.join(self.lines[-60:])}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def engine_pid(self) -> int:
        """The EngineServer replica: a descendant of the serve process (its raylet's worker)."""
        children: dict[int, list[int]] = {}
        cmds: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmds[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
        todo, found = [self.proc.pid], []
        while todo:
            pid = todo.pop()
            if ":EngineServer" in cmds.get(pid, ""):
                found.append(pid)
            todo.extend(children.get(pid, ()))
        if len(found) != 1:
            raise SystemExit(f"expected one EngineServer process under the serve process, found {found}")
        return found[0]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client ------------------------------------------------------------------------------------


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:500]!r}")
        return json.loads(body)
    finally:
        conn.close()


def stream_completion(port: int, prompt: list[int], max_tokens: int, out: Stream) -> None:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=None)
    try:
        out.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:500]!r}"
            return
        for raw in resp:
            if not raw.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(raw[6:])
            if "error" in chunk:
                out.error = f"stream error: {chunk['error']}"
                return
            for choice in chunk.get("choices", ()):
                ids = choice.get("token_ids") or ()
                out.stamps.extend([now] * len(ids))
                out.token_ids.extend(ids)
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except Exception as exc:  # noqa: BLE001 - reported by the parent with the server's output
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def run(args: argparse.Namespace, ckpt: Path, workdir: Path) -> dict:
    config_path = workdir / "long-context.json"
    config = write_config(args, config_path)
    http_port, grpc_port = free_port(), free_port()
    argv = serve_command(args, ckpt, config_path, http_port, grpc_port)
    server = Server(argv)
    try:
        server.wait_ready(START_TIMEOUT_S)
        _progress(f"moe-cluster serve up on HTTP {http_port}")
        max_model_len = get_json(http_port, "/v1/models")["data"][0]["max_model_len"]
        pid = server.engine_pid()
        idle, cpu0 = memory_kib(pid), cpu_seconds(pid)
        prompt = fixed_request(args.seed, args.prompt_len, 1, TOKEN_RANGE).prompt
        stream = Stream(time.perf_counter())
        client = threading.Thread(target=stream_completion, args=(http_port, prompt, args.max_tokens, stream))
        client.start()
        polls: list[dict] = []
        while client.is_alive():  # the engine's own accounting while the request holds its blocks
            polls.append(get_json(http_port, "/v1/engine/stats"))
            # every poll_s through the prefill (blocks grow a chunk at a time), then as often as it
            # answers while the answer streams: the whole request's blocks are held only then
            client.join(timeout=args.poll_s if not stream.stamps else 0.0)
        after = get_json(http_port, "/v1/engine/stats")
        memory, cpu = memory_kib(pid), cpu_seconds(pid) - cpu0
    finally:
        rc = server.stop()
    if stream.error or len(stream.token_ids) != args.max_tokens:
        raise SystemExit(f"the request failed ({stream.error or f'{len(stream.token_ids)} tokens'}); "
                         f"serve output:\n{''.join(server.lines[-60:])}")
    _progress(f"answered: first token after {stream.stamps[0] - stream.sent:.1f} s, {len(stream.token_ids)} tokens")
    logged = [line.strip() for line in server.lines if "max_model_len" in line or "KV pool" in line]
    return {"argv": argv, "config": config, "config_path": str(config_path), "max_model_len": max_model_len,
            "stream": stream, "polls": polls, "after": after, "idle_kib": idle, "memory_kib": memory,
            "engine_cpu_s": cpu, "serve_rc": rc, "logged": logged[:4]}


# -- the report ------------------------------------------------------------------------------------


def kv_bytes_per_token(ckpt: Path, block_size: int) -> int:
    """The engine's own accounting of one token's KV bytes (its block size over its block bytes)."""
    import torch

    from cluster.engine.block_manager import cache_bytes_per_block
    from cluster.model.config import load_model_config

    config = load_model_config(ckpt)
    return cache_bytes_per_block(config.text, block_size, getattr(torch, config.dtype)) // block_size


def build_report(args: argparse.Namespace, result: dict, ckpt: Path, command: str) -> str:
    s: Stream = result["stream"]
    polls = result["polls"] or [result["after"]]
    peak_used = max(p["kv_blocks_used"] for p in polls)
    total = polls[-1]["kv_blocks_total"]
    block = BLOCK_SIZE
    per_token = kv_bytes_per_token(ckpt, block)
    ttft = s.stamps[0] - s.sent
    gaps = [b - a for a, b in zip(s.stamps, s.stamps[1:], strict=False)]
    itl = sorted(gaps)[len(gaps) // 2] if gaps else float("nan")
    need = -(-(args.prompt_len + args.max_tokens) // block)
    mem, idle = result["memory_kib"], result["idle_kib"]
    serve = "moe-cluster " + shlex.join(result["argv"]).replace(str(ckpt), f"<{ckpt.name}>").replace(
        result["config_path"], "long-context.json")
    lines = [
        "## 256K tokens served: one long prompt through `moe-cluster serve`",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {machine_line(args.num_cpus)}; "
        f"the whole run took {time.perf_counter() - _T_START:.0f} s.",
        "",
        f"Checkpoint `{ckpt.name}` (preset `{PRESET}`: 1 layer, 1 head, YaRN factor 513 over 512 positions), fp32 "
        f"on CPUs, served by `{serve}` with the config `{json.dumps(result['config'])}`: one engine replica, "
        f"{args.chunk}-token prefill steps. One request, `POST /v1/completions` with a {args.prompt_len:,}-token "
        f"prompt (token ids), greedy, {args.max_tokens} tokens streamed (`stream: true`). KV blocks: the engine's "
        f"`/v1/engine/stats`, polled every {args.poll_s:g} s through the prefill and back to back while the "
        "answer streamed; memory: the EngineServer "
        "replica's process (`VmHWM`, its peak resident set; `VmRSS` before the request); engine CPU: that "
        "process's CPU seconds over the whole request (steadier than wall time on a shared machine).",
        "",
        "| prompt tokens | max_model_len | TTFT (s) | engine CPU (s) | ITL p50 (ms) | KV blocks used (peak) / pool "
        "| block | KV bytes "
        "/ token | KV of the request | KV pool | engine RSS before | engine peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.prompt_len:,} | {result['max_model_len']:,} | {ttft:,.1f} | {result['engine_cpu_s']:,.1f} | "
        f"{itl * 1e3:,.1f} | "
        f"{peak_used:,} / {total:,} | {block} | {per_token} | {peak_used * block * per_token / 2**20:,.1f} MiB | "
        f"{total * block * per_token / 2**20:,.1f} MiB | {idle['VmRSS'] / 1024:,.0f} MiB | "
        f"{mem['VmHWM'] / 1024:,.0f} MiB |",
        "",
        f"The request needs {need:,} blocks of {block} tokens ({args.prompt_len:,} + {args.max_tokens}); the engine "
        f"counted {peak_used:,} at its most. `moe-cluster serve` exited {result['serve_rc']} on SIGTERM.",
    ]
    if result["logged"]:
        lines += ["", "The engine's start log:", "", *[f"    {line}" for line in result["logged"]]]
    for note in args.notes:
        lines += ["", note]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a 16K-token prompt: minutes, the same path")
    ap.add_argument("--write-docs", action="store_true", help="write the row into docs/BENCHMARKS.md")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="default: the cached long-preset checkpoint")
    ap.add_argument("--ckpt-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: 262144 (16384 smoke)")
    ap.add_argument("--max-tokens", type=int, default=64, help="the answer's tokens (at most 512 at 262,144)")
    ap.add_argument("--chunk", type=int, default=None, help="engine max_num_batched_tokens; default 2048")
    ap.add_argument("--kv-cache-bytes", type=int, default=None,
                    help="the engine's KV pool; default 64 MiB (349K tokens of this preset; 16 MiB smoke)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="moe-cluster serve --num-cpus")
    ap.add_argument("--poll-s", type=float, default=1.0, help="seconds between engine stats polls")
    ap.add_argument("--note", dest="notes", action="append", default=[], help="a line added under the table")
    args = ap.parse_args(argv)
    defaults = {"prompt_len": 16384 if args.smoke else 262144, "chunk": 2048,
                "kv_cache_bytes": (16 if args.smoke else 64) * 2**20}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt = ensure_checkpoint(args.ckpt_dir or default_ckpt_dir(PRESET, args.ckpt_seed), PRESET, args.ckpt_seed)
    command = "python -m ops.bench.long_context " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="long-context-") as tmp:
        result = run(args, ckpt, Path(tmp))
    report = build_report(args, result, ckpt, command.strip())
    print(report)
    if args.write_docs:
        print(f"wrote {replace_section(SECTION, report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
