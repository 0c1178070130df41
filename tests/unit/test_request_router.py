"""The KV-aware routing decision (deployments/request_router.py) and the prompt token budget,
without Ray: reports, what was routed since them, staleness, ties."""

from __future__ import annotations

import pytest

from cluster.engine.prefix_hash import block_keys
from deployments.errors import BadRequest, Overloaded
from deployments.frontend.admission import TokenBudget
from deployments.serving.request_router import KVScoreboard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(seq: int, free: int, at: float, running: int = 0, waiting: int = 0) -> dict:
    return {"seq": seq, "time": at, "free_blocks": free, "total_blocks": 100, "block_size": 16,
            "running": running, "waiting": waiting}


def test_most_free_blocks_first_and_unknown_last():
    clock = Clock()
    board = KVScoreboard(stale_after_s=3.0, clock=clock)
    board.observe("a", report(1, 40, clock.now))
    board.observe("b", report(1, 90, clock.now))
    board.observe("c", None)  # never reported
    assert board.rank(["a", "b", "c"]) == [["b"], ["a"], ["c"]]


def test_routed_since_report_counts_until_the_next_report():
    clock = Clock()
    board = KVScoreboard(stale_after_s=3.0, clock=clock)
    board.observe("a", report(1, 100, clock.now))
    board.observe("b", report(1, 95, clock.now))
    # a burst: each request routed to the best replica lowers its score, so they alternate
    picks = []
    for _ in range(6):
        best = board.rank(["a", "b"])[0][0]
        picks.append(best)
        clock.now += 0.01
        board.routed(best, 4)
    assert picks[:2] == ["a", "a"] and set(picks[2:]) == {"a", "b"} and picks.count("a") == 4
    assert board.score("a") == 100 - 16
    # a report taken after those requests arrived includes them: the local counts are dropped
    clock.now += 0.5
    board.observe("a", report(2, 84, clock.now - 0.1))
    assert board.score("a") == 84
    # the same report seen again changes nothing; a request routed after it still counts
    board.routed("a", 2)
    board.observe("a", report(2, 84, clock.now - 0.1))
    assert board.score("a") == 82


def test_stale_reports_fall_back_to_the_last_rank():
    clock = Clock()
    board = KVScoreboard(stale_after_s=3.0, clock=clock)
    board.observe("a", report(1, 100, clock.now))
    board.observe("b", report(1, 10, clock.now))
    clock.now += 2.0
    board.observe("b", report(2, 10, clock.now))
    assert board.rank(["a", "b"]) == [["a"], ["b"]]
    clock.now += 1.5  # a has not reported for 3.5 s
    board.observe("a", report(1, 100, clock.now - 3.5))
    assert board.fresh("b") and not board.fresh("a")
    assert board.rank(["a", "b"]) == [["b"], ["a"]]


def test_ties_go_to_fewer_sequences():
    clock = Clock()
    board = KVScoreboard(clock=clock)
    board.observe("a", report(1, 50, clock.now, running=5))
    board.observe("b", report(1, 50, clock.now, running=1))
    assert board.rank(["a", "b"])[0] == ["b"]


def test_prompt_token_budget():
    budget = TokenBudget(100, retry_after_s=2)
    releases = budget.take([30, 30], "messages")
    assert budget.used == 60
    with pytest.raises(Overloaded, match="prompt token budget full") as err:
        budget.take([50], "messages")
    assert err.value.retry_after_s == 2
    with pytest.raises(BadRequest, match="messages: 101 prompt tokens .* prompt_token_budget of 100") as bad:
        budget.take([101], "messages")
    assert bad.value.param == "messages"
    releases[0]()
    releases[0]()  # idempotent
    assert budget.used == 30
    budget.take([70], "prompt")
    assert budget.used == 100


class _Meta:
    call_method = "generate"


class _Pending:
    def __init__(self, tokens: int) -> None:
        from types import SimpleNamespace

        self.metadata = _Meta()
        self.args = [SimpleNamespace(request_id=f"r{tokens}", prompt_token_ids=tuple(range(tokens)))]


class _ReplicaID(str):
    @property
    def unique_id(self) -> str:
        return str(self)


class _Replica:
    def __init__(self, name: str, stats: dict) -> None:
        self.replica_id = _ReplicaID(name)
        self.routing_stats = stats


def test_a_burst_is_counted_as_it_is_chosen():
    """The routing tasks of a burst all choose before the first request is sent: each choice
    counts its request at the replica it ranked first, so the burst spreads."""
    import asyncio

    from deployments.serving.request_router import KVAwareRequestRouter

    router = object.__new__(KVAwareRequestRouter)  # Serve's constructor needs a running Serve
    router.initialize_state(stale_after_s=3.0)
    now = router.board.clock()
    a, b = _Replica("a", report(1, 100, now)), _Replica("b", report(1, 100, now))
    pending = [_Pending(31) for _ in range(6)]  # 2 blocks each (32 tokens with the first generated)

    async def burst():
        return [(await router.choose_replicas([a, b], p))[0][0] for p in pending]

    firsts = asyncio.run(burst())
    assert sorted(r.replica_id.unique_id for r in firsts) == ["a", "a", "a", "b", "b", "b"]
    assert router.board.score(a.replica_id) == router.board.score(b.replica_id) == 94
    # one went to b although a was ranked first (a full): its count moves, it is not added twice
    chosen_a = next(p for p, r in zip(pending, firsts, strict=True) if r is a)
    router.on_request_routed(chosen_a, b.replica_id, None)
    assert (router.board.score(a.replica_id), router.board.score(b.replica_id)) == (96, 92)
    # stats calls are Serve's choice (one rank, shuffled: equals are not always the first) and count nothing
    stats_call = _Pending(5)
    stats_call.metadata = type("M", (), {"call_method": "stats"})()
    ranks = [asyncio.run(router.choose_replicas([a, b], stats_call)) for _ in range(40)]
    assert all(len(r) == 1 and sorted(x.replica_id.unique_id for x in r[0]) == ["a", "b"] for r in ranks)
    assert {r[0][0].replica_id.unique_id for r in ranks} == {"a", "b"}
    assert (router.board.score(a.replica_id), router.board.score(b.replica_id)) == (96, 92)


# -- prefix-aware ------------------------------------------------------------------------------


def _prompt_call(prompt: list[int], rid: str = "r") -> _Pending:
    from types import SimpleNamespace

    call = _Pending(0)
    call.args = [SimpleNamespace(request_id=rid, prompt_token_ids=tuple(prompt))]
    return call


def _prefix_router(max_imbalance: int = 8):
    from deployments.serving.request_router import KVAwareRequestRouter

    router = object.__new__(KVAwareRequestRouter)  # Serve's constructor needs a running Serve
    router.initialize_state(stale_after_s=30.0, max_imbalance=max_imbalance)
    return router


def _route(router, replicas: list, prompt: list[int]) -> str:
    """One request through the router as Serve sends it: chosen, then routed to the first rank."""
    import asyncio

    call = _prompt_call(prompt)
    chosen = asyncio.run(router.choose_replicas(replicas, call))[0][0]
    router.on_request_routed(call, chosen.replica_id, None)
    return chosen.replica_id.unique_id


def test_two_conversations_stay_on_their_replicas_while_fresh_prompts_spread():
    router = _prefix_router()
    now = router.board.clock()
    a, b = _Replica("a", report(1, 300, now)), _Replica("b", report(1, 300, now))
    talks = {"x": [1] + list(range(100, 150)), "y": [1] + list(range(500, 550))}
    home = {name: _route(router, [a, b], prompt) for name, prompt in talks.items()}
    assert sorted(home.values()) == ["a", "b"], "the first turns spread (the first one's blocks are counted)"
    for turn in range(5):
        for name in talks:  # the answer and the next user message extend the conversation
            talks[name] = talks[name] + list(range(1000 + 40 * turn, 1040 + 40 * turn))
        # each report says the other replica has more room: KV order alone would move them
        now = router.board.clock()
        seq = turn + 2
        a.routing_stats, b.routing_stats = report(seq, 200 - 10 * turn, now), report(seq, 200 - 10 * turn, now)
        for name, prompt in talks.items():
            other = b if home[name] == "a" else a
            other.routing_stats = report(seq, 250, now)
            (a if home[name] == "a" else b).routing_stats = report(seq, 150, now)
            assert _route(router, [a, b], prompt) == home[name], f"turn {turn + 2} of {name} left its replica"
    # fresh prompts share no full block with anything sent: they go by free blocks, and spread
    now = router.board.clock()
    a.routing_stats, b.routing_stats = report(20, 200, now), report(20, 200, now)
    fresh = [_route(router, [a, b], [1] + list(range(3000 + 100 * i, 3000 + 100 * i + 60))) for i in range(6)]
    assert fresh.count("a") == fresh.count("b") == 3


def test_a_prefix_yields_to_load_and_to_room():
    router = _prefix_router(max_imbalance=2)
    now = router.board.clock()
    a, b = _Replica("a", report(1, 300, now)), _Replica("b", report(1, 100, now))
    system = [1] + list(range(100, 163))  # 64 tokens: 4 full blocks
    assert _route(router, [a, b], system + [7, 8]) == "a"
    a.routing_stats, b.routing_stats = report(2, 100, now), report(2, 300, now)
    assert _route(router, [a, b], system + [9, 10]) == "a", "the shared prefix outweighs free blocks"
    a.routing_stats = report(3, 100, now, running=3)  # 3 more in flight than b: over the imbalance
    b.routing_stats = report(3, 300, now, running=0)
    assert _route(router, [a, b], system + [11, 12]) == "b"
    a.routing_stats = report(4, 2, now)  # no room for the rest of the prompt
    b.routing_stats = report(4, 300, now)
    assert _route(router, [a, b], system + list(range(2000, 2100))) == "b"
    assert router.board.prefixes.matched("b", block_keys(system, 16)) == 4, "b is remembered with the prefix now"


def test_prefix_memory_forgets_the_oldest_past_the_pool_and_gone_replicas():
    from deployments.serving.prefix_memory import PrefixMemory

    memory: PrefixMemory[str] = PrefixMemory()
    first = block_keys(list(range(64)), 16)  # 4 blocks
    second = block_keys(list(range(1000, 1064)), 16)
    memory.remember("a", first, capacity=6)
    memory.remember("a", second, capacity=6)
    assert memory.size("a") == 6
    assert memory.matched("a", second) == 4
    assert memory.matched("a", first) == 2, "the oldest prompt's later blocks went first; its prefix stays"
    memory.forget(["b"])
    assert memory.size("a") == 0


def test_a_late_report_does_not_break_a_conversations_affinity():
    clock = Clock()
    board = KVScoreboard(stale_after_s=3.0, clock=clock)
    board.observe("a", report(1, 300, clock.now))
    board.observe("b", report(1, 300, clock.now))
    keys = block_keys([1] + list(range(100, 163)), 16)
    board.sent("a", keys)
    clock.now += 5.0  # a's report is late; b's is fresh
    board.observe("b", report(2, 300, clock.now))
    assert not board.fresh("a")
    assert board.rank(["a", "b"], keys, 70)[0] == ["a"]
    assert board.rank(["a", "b"], block_keys(list(range(5000, 5070)), 16), 70) == [["b"], ["a"]]
