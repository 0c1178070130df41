"""The KV-aware routing decision (deployments/request_router.py) and the prompt token budget,
without Ray: reports, what was routed since them, staleness, ties."""

from __future__ import annotations

import pytest

from deployments.admission import TokenBudget
from deployments.api_errors import BadRequest, Overloaded
from deployments.request_router import KVScoreboard


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
