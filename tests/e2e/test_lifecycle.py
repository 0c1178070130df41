"""Lifecycle: clients gone mid-stream free everything at the engine; overload is refused early
(HTTP 429 + Retry-After, gRPC RESOURCE_EXHAUSTED) and every accepted request completes."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx2 as httpx

from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc
from tests import openai_check
from tests.e2e.support import LIMIT

CLIENTS = 32
LONG = 900  # tokens: far more than is read before the client leaves


def long_body(stream: bool = True, max_tokens: int = LONG) -> dict:
    return {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def test_dropped_clients_free_the_engine(server):
    before = server.wait_idle()

    async def client_that_leaves(http: httpx.AsyncClient, i: int) -> int:
        path = "/v1/completions" if i % 2 else "/v1/chat/completions"
        body = long_body() if i % 2 else {**long_body(), "prompt": None,
                                          "messages": [{"role": "user", "content": f"Story {i}"}]}
        body = {k: v for k, v in body.items() if v is not None}
        async with http.stream("POST", server.url(path), json=body, headers=server.headers) as r:
            received = 0
            async for chunk in openai_check.achunks(r):
                if chunk["choices"]:
                    received += 1
                    if received == 3:
                        return received  # leaving the block closes the connection mid-stream
        raise AssertionError("the stream ended before the client left")

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CLIENTS)) as http:
            return await asyncio.gather(*(client_that_leaves(http, i) for i in range(CLIENTS)))

    assert asyncio.run(run()) == [3] * CLIENTS
    left = time.monotonic()
    after = server.wait_idle(timeout_s=20)
    took = time.monotonic() - left
    assert after["aborts"] - before["aborts"] == CLIENTS, after
    assert after["kv_blocks_used"] == 0 and after["ingress_in_flight"] == 0
    # Nobody ran to the end: every request was aborted long before its LONG tokens.
    assert after["generation_tokens"] - before["generation_tokens"] < CLIENTS * LONG / 2
    print(f"engine idle {took:.2f}s after {CLIENTS} clients left")


def test_overload_is_refused_early(server):
    """Two long streams fill the limits app; every further request, HTTP or gRPC, is refused at once,
    and the two accepted ones still complete."""
    server.wait_idle("limits")
    url = server.url("/v1/completions", "limits")

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            started = [asyncio.Event() for _ in range(LIMIT)]

            async def accepted(i: int) -> dict:
                tokens, finish = 0, None
                async with http.stream("POST", url, json={**long_body(max_tokens=300), "return_token_ids": True},
                                       headers=server.headers) as r:
                    async for chunk in openai_check.achunks(r):
                        choice = chunk["choices"][0]
                        tokens += len(choice["token_ids"])
                        finish = choice["finish_reason"] or finish
                        started[i].set()
                return {"tokens": tokens, "finish": finish}

            fills = [asyncio.ensure_future(accepted(i)) for i in range(LIMIT)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)

            async def refused(stream: bool) -> tuple[int, float, str | None]:
                t0 = time.monotonic()
                r = await http.post(url, json=long_body(stream=stream, max_tokens=5), headers=server.headers)
                return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

            refusals = await asyncio.gather(*(refused(i % 2 == 0) for i in range(8)))
            grpc_refusals = await asyncio.to_thread(grpc_overflow, server)
            results = await asyncio.gather(*fills)
        for status, seconds, retry_after in refusals:
            assert status == 429 and retry_after == "1"
            assert seconds < 5, f"a refusal took {seconds:.1f}s"
        assert grpc_refusals == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
        assert results == [{"tokens": 300, "finish": "length"}] * LIMIT

    asyncio.run(run())
    assert server.wait_idle("limits")["ingress_in_flight"] == 0
    openai_check.body(httpx.post(url, json=long_body(stream=False, max_tokens=2), headers=server.headers, timeout=60))


def grpc_overflow(server) -> list[grpc.StatusCode]:
    codes = []
    with server.channel() as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        req = pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(max_tokens=2))
        for call in (stub.Generate, stub.GenerateStream) * 2:
            try:
                out = call(req, metadata=server.metadata("limits"), timeout=5)
                list(out) if not isinstance(out, pb.GenerateResponse) else None
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    return codes
