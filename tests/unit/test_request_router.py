"""The KV-aware routing decision (deployments/request_router.py) and the prompt token budget,
without Ray: reports, what was routed since them, staleness, ties."""

from __future__ import annotations

import pytest

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
    # stats calls are Serve's choice and count nothing
    stats_call = _Pending(5)
    stats_call.metadata = type("M", (), {"call_method": "stats"})()
    assert asyncio.run(router.choose_replicas([a, b], stats_call)) == [[a, b]]
