"""Long context at the serving level: KV-aware routing between two engine replicas (the `routing`
app), and a long prompt prefilled in chunks beside a decoding stream (the `limits` app, 64-token
steps)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx2 as httpx
import pytest

from tests import openai_check
from tests.e2e.support import ROUTING_ENGINE

LONG_PROMPT = [1] + list(range(2000, 3500))  # 1501 tokens: 94 of the replica's KV blocks


def engine_replicas(app: str = "routing") -> list:
    import ray

    from deployments.app import ENGINE_DEPLOYMENT

    prefix = f"SERVE_REPLICA::{app}#{ENGINE_DEPLOYMENT}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [ray.get_actor(n, namespace="serve") for n in names]


def reports(actors: list) -> dict[str, dict]:
    """Each replica's own routing report, asked of the replica actor directly: the ground truth.
    (Each call counts as a report: `seq` goes up by one.)"""
    import ray

    out = {}
    for actor in actors:
        r = ray.get(actor.record_routing_stats.remote(), timeout=30)
        out[r["replica"]] = r
    return out


def poll(what: str, condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.05)


def wait_reports_sent(actors: list, rounds: int = 2) -> dict[str, dict]:
    """Polls until Serve's controller has asked every replica for `rounds` more routing reports
    (each is broadcast to the handles, the ingress's request router among them): their `seq` has
    gone past what this test's own reads account for. Returns the last reads."""
    first = reports(actors)
    reads = [first]

    def sent() -> bool:
        reads.append(reports(actors))
        by_controller = {r: reads[-1][r]["seq"] - first[r]["seq"] - (len(reads) - 1) for r in first}
        return all(n >= rounds for n in by_controller.values())

    poll(f"{rounds} routing reports of every replica sent", sent)
    return reads[-1]


class Streamer(threading.Thread):
    """A streamed completion read in the background; `tokens` holds each token's arrival time."""

    def __init__(self, url: str, headers: dict, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.body = url, headers, {**body, "stream": True}
        self.tokens: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=120) as r:
                for chunk in openai_check.chunks(r):
                    if self.stop.is_set():
                        return  # leaving the stream cancels the request
                    if chunk["choices"]:
                        self.tokens.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_tokens(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.tokens) < n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"{len(self.tokens)} tokens after {timeout_s}s"
            time.sleep(0.02)


@pytest.mark.slow  # its own application of two engine replicas
def test_new_requests_avoid_the_replica_holding_a_long_prompt(server):
    """One replica holds a long prompt (1 request, 94 KV blocks), the other two short streams (2
    requests, a few blocks): new requests go to the one with more free KV blocks although it has
    more requests in flight (where Serve's default, the shorter queue, would send them)."""
    server.wait_idle("routing")
    actors = engine_replicas(server.app("routing").app_name)
    assert len(actors) == 2
    wait_reports_sent(actors)  # both replicas' reports have reached the ingress's request router
    base = reports(actors)
    assert len(base) == 2 and all(r["free_blocks"] == ROUTING_ENGINE["num_kv_blocks"] for r in base.values())
    url = server.url("/v1/completions", "routing")
    room = ROUTING_ENGINE["max_model_len"] - len(LONG_PROMPT) - 1
    streams = [Streamer(url, server.headers, {"prompt": LONG_PROMPT, "max_tokens": room, "temperature": 0,
                                              "ignore_eos": True})]
    try:
        streams[0].start()
        streams[0].wait_tokens(2)
        now = reports(actors)
        holder = next(r for r, s in now.items() if s["requests"] == base[r]["requests"] + 1)
        other = next(r for r in now if r != holder)
        assert now[holder]["free_blocks"] < now[other]["free_blocks"] - 90
        wait_reports_sent(actors)  # the holder's report of its blocks in use has reached the request router
        for i in range(2):
            streams.append(Streamer(url, server.headers, {"prompt": f"Keep talking {i}", "max_tokens": room,
                                                          "temperature": 0, "ignore_eos": True}))
            streams[-1].start()
            streams[-1].wait_tokens(2)
        poll("three streams running", lambda: sum(s["running"] for s in reports(actors).values()) == 3)
        now = reports(actors)
        assert now[other]["requests"] - base[other]["requests"] == 2, (base, now)
        assert now[other]["running"] == 2 and now[holder]["running"] == 1

        for i in range(4):
            openai_check.body(httpx.post(url, headers=server.headers, timeout=60, json={
                "prompt": f"Short request {i}", "max_tokens": 2, "temperature": 0, "ignore_eos": True}))
        after = reports(actors)
        assert all(s.is_alive() and s.error is None for s in streams)  # all still holding their KV blocks
        assert after[holder]["requests"] - base[holder]["requests"] == 1, (base, after)
        assert after[other]["requests"] - base[other]["requests"] == 6, (base, after)
    finally:
        for s in streams:
            s.stop.set()
        for s in streams:
            s.join(timeout=60)
    server.wait_idle("routing")


def test_long_prompt_prefills_in_chunks_beside_a_decoding_stream(server):
    """64-token steps: the 900-token prompt takes ~15 steps, and the decoding stream advances by a
    token in each of them instead of waiting for the whole prefill."""
    server.wait_idle("limits")
    url = server.url("/v1/completions", "limits")
    decoding = Streamer(url, server.headers, {"prompt": "Count with me", "max_tokens": 800, "temperature": 0,
                                              "ignore_eos": True})
    decoding.start()
    try:
        decoding.wait_tokens(5)
        sent = time.monotonic()
        r = httpx.post(url, headers=server.headers, timeout=120, json={
            "prompt": [1] + list(range(3000, 3900)), "max_tokens": 1, "temperature": 0, "ignore_eos": True})
        done = time.monotonic()
        assert openai_check.body(r)["usage"]["prompt_tokens"] == 901
        during = [t for t in decoding.tokens if sent <= t <= done]
        assert decoding.is_alive() and decoding.error is None
        assert len(during) >= 5, f"the decoding stream got {len(during)} tokens during the long prefill"
    finally:
        decoding.stop.set()
        decoding.join(timeout=60)
    server.wait_idle("limits")


@pytest.mark.slow  # its own application of two engine replicas
def test_conversations_stay_on_their_replicas_while_fresh_prompts_spread(server):
    """Two conversations started together land on the two replicas (the burst is counted as it is
    routed); each later turn goes back to its conversation's replica, whose prefix cache gives the
    earlier turns (`cached_tokens`), although the reports would let either replica take it; fresh
    prompts sent together still spread over both."""
    from concurrent.futures import ThreadPoolExecutor

    server.wait_idle("routing")
    actors = engine_replicas(server.app("routing").app_name)
    wait_reports_sent(actors)
    url = server.url("/v1/completions", "routing")

    def send(prompt: list[int]) -> dict:
        return openai_check.body(httpx.post(url, headers=server.headers, timeout=120, json={
            "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}))

    def served_by(prompt: list[int]) -> tuple[str, dict]:
        before = reports(actors)
        body = send(prompt)
        after = reports(actors)
        (replica,) = [r for r in after if after[r]["requests"] > before[r]["requests"]]
        return replica, body

    talks = {"x": [1] + list(range(4000, 4100)), "y": [1] + list(range(4200, 4300))}
    base = reports(actors)
    with ThreadPoolExecutor(2) as pool:
        firsts = dict(zip(talks, pool.map(send, talks.values()), strict=True))
    now = reports(actors)
    assert sorted(now[r]["requests"] - base[r]["requests"] for r in now) == [1, 1], "the first turns spread"
    home: dict[str, str] = {}
    last = firsts
    for turn in range(2, 6):
        for name in talks:  # the answer, then the next message
            answer = last[name]["choices"][0]["token_ids"]
            talks[name] = talks[name] + answer + list(range(5000 + 100 * turn, 5000 + 100 * turn + 20))
        last = {}
        for name, prompt in talks.items():
            replica, last[name] = served_by(prompt)
            home.setdefault(name, replica)
            assert replica == home[name], f"turn {turn} of conversation {name} left its replica"
            cached = last[name]["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= (len(prompt) - 40) // 16 * 16, f"turn {turn} of {name}: {cached} cached tokens"
    assert home["x"] != home["y"]

    server.wait_idle("routing")
    base = reports(actors)
    fresh = [[1] + list(range(6000 + 200 * i, 6000 + 200 * i + 100)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(send, fresh))
    now = reports(actors)
    assert all(now[r]["requests"] - base[r]["requests"] >= 2 for r in now), (base, now)
    server.wait_idle("routing")
