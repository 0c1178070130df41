"""Prefix caching through the HTTP API: a chat's second turn finds its first turn's blocks cached,
prefills only its new tokens (the engine's counts say so), and `usage.prompt_tokens_details.
cached_tokens` reports the cached part, whole and streamed."""

from __future__ import annotations

import uuid

from tests.e2e.test_openai_api import client

BS = 16  # the main app's engine block size (EngineSettings' default)


def test_second_chat_turn_prefills_only_its_new_tokens(server):
    server.wait_idle("main")
    c = client(server)
    # words of their own, so that no earlier test's blocks are found
    first_user = "Remember these words: " + " ".join(uuid.uuid4().hex[:8] for _ in range(24))
    messages = [{"role": "user", "content": first_user}]
    turn1 = c.chat.completions.create(model="", max_tokens=8, temperature=0, messages=messages,
                                      extra_body={"ignore_eos": True})
    p1 = turn1.usage.prompt_tokens
    assert p1 > 4 * BS
    assert turn1.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": turn1.choices[0].message.content},
                 {"role": "user", "content": "Now say the third word."}]
    before = server.wait_idle("main")
    turn2 = c.chat.completions.create(model="", max_tokens=8, temperature=0, messages=messages,
                                      extra_body={"ignore_eos": True})
    after = server.wait_idle("main")
    p2, cached = turn2.usage.prompt_tokens, turn2.usage.prompt_tokens_details.cached_tokens
    assert cached % BS == 0 and p1 // BS * BS <= cached < p2, (p1, p2, cached)
    # the engine's own counts: the whole prompt looked up, the cached part not prefilled
    assert after["prefix_queried_tokens"] - before["prefix_queried_tokens"] == p2
    assert after["prefix_cached_tokens"] - before["prefix_cached_tokens"] == cached
    assert p2 - cached < p2 - p1 + BS, "prefilled: the answer, the new message, and the partial block of turn 1"

    # the third turn, streamed: the usage chunk says the same
    messages += [{"role": "assistant", "content": turn2.choices[0].message.content},
                 {"role": "user", "content": "And the fourth."}]
    chunks = list(c.chat.completions.create(model="", max_tokens=4, temperature=0, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= p2 // BS * BS
    server.wait_idle("main")


def test_cache_salt_keeps_tenants_apart(server):
    server.wait_idle("main")
    c = client(server)
    prompt = "Tenant data: " + " ".join(uuid.uuid4().hex[:8] for _ in range(20))
    ask = dict(model="", max_tokens=2, temperature=0, messages=[{"role": "user", "content": prompt}])
    first = c.chat.completions.create(**ask, extra_body={"cache_salt": "tenant-a"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    other = c.chat.completions.create(**ask, extra_body={"cache_salt": "tenant-b"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0, "another tenant finds nothing cached"
    same = c.chat.completions.create(**ask, extra_body={"cache_salt": "tenant-a"})
    assert same.usage.prompt_tokens_details.cached_tokens == (same.usage.prompt_tokens - 1) // BS * BS
    server.wait_idle("main")


def test_grpc_usage_reports_cached_tokens_and_takes_a_salt(server):
    from deployments.protos import moe_cluster_pb2 as pb
    from deployments.protos import moe_cluster_pb2_grpc as pb_grpc

    server.wait_idle("main")
    prompt = [1] + [1000 + (uuid.uuid4().int >> (8 * i)) % 90_000 for i in range(60)]  # 61 tokens of its own
    sampling = pb.SamplingOptions(max_tokens=2, temperature=0, ignore_eos=True)
    with server.channel() as channel:
        stub = pb_grpc.MoeClusterStub(channel)

        def usage(salt: str = "") -> pb.Usage:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling, cache_salt=salt)
            return stub.Generate(req, metadata=server.metadata(), timeout=60).usage

        assert usage().cached_tokens == 0
        assert usage().cached_tokens == (len(prompt) - 1) // BS * BS == 48
        assert usage("tenant-a").cached_tokens == 0, "a salt shares nothing with unsalted requests"
    server.wait_idle("main")
