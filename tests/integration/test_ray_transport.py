"""The `ray` transport (engines sharing shards, M:N) and surviving a dead shard with both
distributed transports."""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster import LLM, SamplingParams
from cluster.model.config import load_model_config
from tests.reference import assert_matches_reference, reference_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return _prompts(6, seed=7)


@pytest.fixture(scope="module")
def local_tokens(tiny_ckpt: Path, prompts) -> list[tuple[int, ...]]:
    return [o.token_ids for o in LLM(tiny_ckpt).generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("num_shards, num_engines", [(2, 1), (4, 1), (2, 2)])
def test_ray_transport_matches_local_and_reference(expert_nodes, tiny_ckpt: Path, prompts, local_tokens,
                                                   num_shards: int, num_engines: int) -> None:
    llm = LLM(tiny_ckpt, transport="ray", num_expert_shards=num_shards, num_engines=num_engines)
    try:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            assert out.token_ids == local_tokens[i], f"request {i}: ray transport differs from LocalDispatcher"
            assert_matches_reference(out.token_ids, reference_greedy(tiny_ckpt, prompt, GREEDY.max_tokens), f"#{i}")
        shards = llm.group.shards
        assert len(set(ray.get([s.node_id.remote() for s in shards]))) == num_shards
        engines = llm.group.engines
        assert len(engines) == num_engines
        sent = [ray.get(e.pairs_sent.remote()) for e in engines]
        counts = [ray.get(s.token_counts.remote()) for s in shards]
        for layer in sent[0]:
            assert sum(int(c[layer].sum()) for c in counts if layer in c) == sum(s[layer] for s in sent)
        routed = [ray.get(e.token_counts.remote()) for e in engines]  # per expert, as the engines saw it
        for layer in routed[0]:
            assert sum(r[layer] for r in routed).tolist() == sum(c[layer] for c in counts if layer in c).tolist()
        for e in engines:
            free, total = ray.get(e.check_integrity.remote())
            assert free == total
    finally:
        llm.close()


@pytest.mark.parametrize("transport", ["ray", "deepspeed"])
def test_a_killed_shard_is_replaced_and_requests_finish(expert_nodes, tiny_ckpt: Path, transport: str) -> None:
    prompts = _prompts(16, seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in LLM(tiny_ckpt).generate(prompts, params, use_tqdm=False)]
    llm = LLM(tiny_ckpt, transport=transport, num_expert_shards=2, exchange_deadline_s=10.0)
    try:
        engine = llm.group.engine
        victim = llm.group.shards[1]
        victim_id = victim._actor_id.hex()
        result: dict[str, object] = {}
        runner = threading.Thread(target=lambda: result.update(outs=llm.generate(prompts, params, use_tqdm=False)))
        started = time.monotonic()
        runner.start()
        while ray.get(engine.stats.remote()).generation_tokens < 16 * 5:  # mid-generation
            assert time.monotonic() - started < 120, "generation never got going"
            time.sleep(0.05)
        ray.kill(victim, no_restart=True)
        runner.join(timeout=180)
        assert not runner.is_alive(), "generation hung after a shard died"
        outs = result["outs"]
        assert [o.token_ids for o in outs] == expected
        reforms = ray.get(engine.reforms.remote())
        assert len(reforms) >= 1 and all(t > 0 for t in reforms)
        assert llm.group.shards[1]._actor_id.hex() != victim_id
        # The re-formed group serves new requests, and every block is free.
        again = llm.generate(prompts[:2], params, use_tqdm=False)
        assert [o.token_ids for o in again] == expected[:2]
        free, total = ray.get(engine.check_integrity.remote())
        assert free == total
    finally:
        llm.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _pinned_ray_objects() -> tuple[set[str], set[str]]:
    """(alive actors of the expert group's classes, placement groups not removed)."""
    from ray.util.state import list_actors

    classes = ("ShardWorker", "ShardRegistry", "EngineWorker")
    actors = {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
              if a.class_name in classes}
    groups = {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    return actors, groups


def test_a_stranger_at_a_shard_port_gets_nothing_and_generation_still_matches(
        expert_nodes, tiny_ckpt: Path, prompts, local_tokens) -> None:
    """Each shard's exchange port, reached without the group's secret (a well-formed exchange
    frame straight away; an answer to the challenge with a wrong HMAC), computes nothing and
    closes the connection; the engines' own connections keep working, generation still matches;
    and closing the LLM leaves no actor or placement group of its group behind."""
    text = load_model_config(tiny_ckpt).text
    before = _pinned_ray_objects()
    llm = LLM(tiny_ckpt, transport="ray", num_expert_shards=2)
    try:
        assert [o.token_ids for o in llm.generate(prompts[:2], GREEDY, use_tqdm=False)] == local_tokens[:2]
        shards = llm.group.shards
        node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        for shard in shards:
            host, port = ray.get(shard.exchange_address.remote())
            assert host == node_ips[ray.get(shard.node_id.remote())] != "0.0.0.0"  # its node's address only
            computed = ray.get(shard.coalesced.remote())[0]
            n = 3
            frame = (struct.pack("<iiiiB", text.moe_layers[0], n, text.hidden_size, text.num_experts_per_tok, 0)
                     + bytes(n * text.hidden_size * 4) + bytes(n * text.num_experts_per_tok * 8)
                     + bytes(n * text.num_experts_per_tok * 4))
            with socket.create_connection((host, port), timeout=30) as raw:  # no handshake: a frame at once
                raw.sendall(frame)
                answer = _read_until_closed(raw)
            assert answer[:4] == b"MOEX" and len(answer) == 37, answer  # the challenge, then closed: no rows
            with socket.create_connection((host, port), timeout=30) as raw:  # a wrong HMAC, then the frame
                raw.settimeout(30)
                greeting = b""
                while len(greeting) < 37:
                    greeting += raw.recv(37 - len(greeting))
                mine = b"c" * 32
                raw.sendall(mine + hmac.new(b"w" * 32, b"client" + greeting[5:] + mine, hashlib.sha256).digest())
                try:
                    raw.sendall(frame)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert _read_until_closed(raw) == b""
            assert ray.get(shard.coalesced.remote())[0] == computed  # nothing computed for the strangers
            accepted, refused = ray.get(shard.wire_peers.remote())
            assert refused == 2 and accepted >= 1
        # The shards still answer the engine: a full generation matches, through the same connections.
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outs] == local_tokens
        assert all(ray.get(s.wire_peers.remote())[1] == 2 for s in shards)
    finally:
        llm.close()
    deadline = time.monotonic() + 60
    while (left := _pinned_ray_objects()) != before:
        assert time.monotonic() < deadline, f"left behind by LLM.close(): {left[0] - before[0]} {left[1] - before[1]}"
        time.sleep(0.5)
