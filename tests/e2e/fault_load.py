"""A bounded load for the fault tests: concurrent greedy streams (HTTP chat with `return_token_ids`,
gRPC GenerateStream over the same prompt ids), each classified when it ends, and a fault fired
once the load is under way.

Every stream ends one way (`Outcome.status`):
- `finished`: its finish_reason and `[DONE]` (HTTP) or the end of the call (gRPC) came;
- `retryable`: an explicit retryable error: HTTP 503 / 429 before the stream started, an SSE error
  event with code 503 after, gRPC UNAVAILABLE / RESOURCE_EXHAUSTED;
- `cut`: the connection ended without either (no `[DONE]`, no error event);
- `error`: any other error (a 500, INTERNAL, a 4xx);
- `hung`: nothing ended it before the load's deadline.

Tokens of finished streams are compared with the transformers reference under the tie rule
(tests/reference.py) by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx

from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc

RETRYABLE_HTTP = (429, 503)
RETRYABLE_GRPC = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
REPORT_ENV = "MOE_FAULT_REPORT"  # a JSON-lines file the fault tests append their figures to


@dataclass
class Outcome:
    index: int
    protocol: str  # "http" | "grpc"
    status: str = "hung"
    tokens: list[int] = field(default_factory=list)
    started_at: float | None = None  # monotonic: the response began (HTTP 200, the first gRPC message)
    first_token_at: float | None = None
    ended_at: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Stream:
    """One request of the load: the chat messages (HTTP) and their prompt ids (gRPC)."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    protocol: str


async def _http_stream(http: httpx.AsyncClient, url: str, headers: dict[str, str], s: Stream, max_tokens: int,
                       out: Outcome) -> None:
    body = {"messages": s.messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    try:
        async with http.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                out.status = "retryable" if r.status_code in RETRYABLE_HTTP else "error"
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            out.started_at = time.monotonic()
            finished = done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    code = chunk["error"].get("code")
                    out.status = "retryable" if code in RETRYABLE_HTTP else "error"
                    out.error = f"SSE error {code}: {chunk['error'].get('message', '')[:200]}"
                    return
                for choice in chunk.get("choices", ()):
                    ids = choice.get("token_ids") or []
                    if ids and out.first_token_at is None:
                        out.first_token_at = time.monotonic()
                    out.tokens.extend(ids)
                    finished = finished or choice.get("finish_reason") is not None
            out.status = "finished" if finished and done else "cut"
            out.error = "" if out.status == "finished" else f"ended without finish/[DONE] ({finished}, {done})"
    except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
        out.status, out.error = "cut", f"{type(exc).__name__}: {exc}"
    finally:
        out.ended_at = time.monotonic()


async def _grpc_stream(stub: Any, metadata: list[tuple[str, str]], s: Stream, max_tokens: int,
                       out: Outcome) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=s.prompt_ids), sampling=pb.SamplingOptions(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))
    finished = False
    try:
        async for message in stub.GenerateStream(request, metadata=metadata):
            if out.started_at is None:
                out.started_at = time.monotonic()
            if message.token_ids and out.first_token_at is None:
                out.first_token_at = time.monotonic()
            out.tokens.extend(message.token_ids)
            finished = finished or bool(message.finish_reason)
        out.status = "finished" if finished else "cut"
    except grpc.aio.AioRpcError as exc:
        out.status = "retryable" if exc.code() in RETRYABLE_GRPC else "error"
        out.error = f"gRPC {exc.code().name}: {(exc.details() or '')[:200]}"
    finally:
        out.ended_at = time.monotonic()


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    fault_at: float | None  # monotonic, when the fault fired
    fault_result: Any = None

    def by_status(self) -> dict[str, int]:
        counts = {k: 0 for k in ("finished", "retryable", "cut", "error", "hung")}
        for o in self.outcomes:
            counts[o.status] += 1
        return counts

    def started_before_fault(self, o: Outcome, margin_s: float = 0.0) -> bool:
        """Whether the stream's response had begun by the fault (`margin_s` later: a response that
        began before it may take a moment to arrive)."""
        return o.started_at is not None and self.fault_at is not None and o.started_at <= self.fault_at + margin_s


async def run_load(http_url: str, grpc_target: str, headers: dict[str, str], metadata: list[tuple[str, str]],
                   streams: Sequence[Stream], max_tokens: int, fault: Callable[[], Any] | None = None,
                   fault_after_tokens: int = 2, fault_when_started: int = 4, deadline_s: float = 120.0) -> LoadResult:
    """Runs every stream at once; `fault` (blocking, run in a thread) fires once `fault_when_started`
    streams have received `fault_after_tokens` tokens. Streams still open at `deadline_s` are `hung`."""
    outcomes = [Outcome(i, s.protocol) for i, s in enumerate(streams)]
    result = LoadResult(outcomes, None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s), limits=httpx.Limits(
            max_connections=len(streams))) as http, grpc.aio.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        tasks = [asyncio.ensure_future(
            _http_stream(http, http_url, headers, s, max_tokens, o) if s.protocol == "http"
            else _grpc_stream(stub, metadata, s, max_tokens, o)) for s, o in zip(streams, outcomes, strict=True)]
        fault_task = None
        if fault is not None:
            async def fire() -> None:
                while sum(len(o.tokens) >= fault_after_tokens for o in outcomes) < fault_when_started:
                    if all(t.done() for t in tasks):
                        break
                    await asyncio.sleep(0.01)
                result.fault_at = time.monotonic()
                result.fault_result = await asyncio.to_thread(fault)
            fault_task = asyncio.ensure_future(fire())
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()  # its outcome stays `hung`
        await asyncio.gather(*pending, return_exceptions=True)
        if fault_task is not None:
            await fault_task
    return result


def record(fault: str, result: LoadResult, recovery_s: float | None, wrong: int, note: str = "") -> dict[str, Any]:
    """The fault's figures, appended to `$MOE_FAULT_REPORT` (JSON lines) when set."""
    counts = result.by_status()
    row = {"fault": fault, "requests": len(result.outcomes), **counts, "wrong": wrong,
           "recovery_s": None if recovery_s is None else round(recovery_s, 1), "note": note}
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"fault {fault}: {row}")
    return row


def describe(result: LoadResult) -> str:
    return "\n".join(f"{o.index} {o.protocol} {o.status} {len(o.tokens)} tokens {o.error}"
                     for o in result.outcomes if o.status != "finished") or "all finished"
