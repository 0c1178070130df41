"""KV-aware request routing to router replicas: a Ray Serve custom request router.

Every router replica reports its KV state through `Router.record_routing_stats()`, which Serve's
controller calls every `routing.stats_period_s` (0.5 s by default) and broadcasts to every
DeploymentHandle when it changes; a report carries a sequence number and the replica's clock, so
each one is a change. In each handle (the ingress replicas, the benchmark's driver), this router
ranks the replicas by their free KV blocks net of what the prompts already there will still take,
minus what this handle routed to them since their last report (a burst must not herd onto the
replica that looked emptiest a moment ago). Replicas without a fresh report (just started, or
slower to report than `stale_after_s`) come last, together, where Serve's queue-length choice
decides. Each rank holds one replica, so a full replica (max_ongoing_requests) falls through to
the next.

Configured on the Router deployment (deployments/app.py):

    request_router_config=RequestRouterConfig(
        request_router_class="deployments.request_router:KVAwareRequestRouter",
        request_router_kwargs={"stale_after_s": 3.0},
        request_routing_stats_period_s=0.5)
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

ROUTER_CLASS = "deployments.request_router:KVAwareRequestRouter"
# A request routed this long before a report's clock is taken to be in it; the margin covers
# the hop to the replica (a request still in flight is counted twice for a moment, never zero).
IN_REPORT_MARGIN_S = 0.05
DEFAULT_BLOCK_SIZE = 16


@dataclass
class _Replica:
    seq: Any = None
    stats: Mapping[str, Any] = field(default_factory=dict)
    seen_at: float = 0.0  # local clock when this report was first seen
    routed: deque = field(default_factory=deque)  # (local time, blocks) routed since the report


class KVScoreboard:
    """The routing decision, apart from Serve's machinery (unit-tested on its own)."""

    def __init__(self, stale_after_s: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._replicas: dict[Hashable, _Replica] = {}

    def observe(self, replica: Hashable, stats: Mapping[str, Any] | None) -> None:
        """Takes a replica's latest report (the same one again is a no-op)."""
        now = self.clock()
        state = self._replicas.setdefault(replica, _Replica())
        if stats and stats.get("seq") is not None and stats.get("seq") != state.seq:
            state.seq, state.stats, state.seen_at = stats.get("seq"), stats, now
            reported = float(stats.get("time", now))
            while state.routed and state.routed[0][0] <= reported - IN_REPORT_MARGIN_S:
                state.routed.popleft()
        while state.routed and state.routed[0][0] < now - self.stale_after_s:
            state.routed.popleft()  # whatever report it was in, it is older than any fresh one

    def fresh(self, replica: Hashable) -> bool:
        state = self._replicas.get(replica)
        if state is None or state.seq is None:
            return False
        # by this handle's clock (first sight of the report), so clock skew between nodes cannot
        # make a report look fresh or stale
        return self.clock() - state.seen_at <= self.stale_after_s

    def score(self, replica: Hashable) -> float:
        """Free KV blocks net of reported prompts and of what was routed here since the report."""
        state = self._replicas[replica]
        return float(state.stats.get("free_blocks", 0)) - sum(b for _, b in state.routed)

    def load(self, replica: Hashable) -> int:
        state = self._replicas[replica]
        return int(state.stats.get("running", 0)) + int(state.stats.get("waiting", 0)) + len(state.routed)

    def rank(self, replicas: Iterable[Hashable]) -> list[list[Hashable]]:
        """Fresh replicas one per rank, most free blocks first (ties: fewer sequences, then random);
        the others together in a last rank."""
        known, unknown = [], []
        for r in replicas:
            (known if self.fresh(r) else unknown).append(r)
        random.shuffle(known)
        known.sort(key=lambda r: (-self.score(r), self.load(r)))
        ranks = [[r] for r in known]
        if unknown:
            ranks.append(unknown)
        return ranks

    def routed(self, replica: Hashable, blocks: float) -> None:
        state = self._replicas.setdefault(replica, _Replica())
        state.routed.append((self.clock(), blocks))

    def block_size(self, replica: Hashable) -> int:
        state = self._replicas.get(replica)
        size = state.stats.get("block_size") if state else None
        return int(size) if size else DEFAULT_BLOCK_SIZE


def request_tokens(pending_request: PendingRequest | None) -> int | None:
    """Prompt tokens of a `generate` call (its GenerateRequest), None for any other method."""
    if pending_request is None or pending_request.metadata.call_method != "generate" or not pending_request.args:
        return None
    prompt = getattr(pending_request.args[0], "prompt_token_ids", None)
    return len(prompt) if prompt is not None else None


class KVAwareRequestRouter(RequestRouter):
    """Routes each `generate` call to the router replica with the most free KV blocks."""

    def initialize_state(self, stale_after_s: float = 3.0, **kwargs: Any) -> None:
        self.board = KVScoreboard(stale_after_s)
        self.decisions: deque[tuple[str, str, float]] = deque(maxlen=1024)  # (request, replica, score)

    def _board(self) -> KVScoreboard:
        if not hasattr(self, "board"):  # initialize_state is Serve's to call; never fail without it
            self.initialize_state()
        return self.board

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        board = self._board()
        for r in replicas:  # a broadcast: the reports are seen as they arrive
            board.observe(r.replica_id, r.routing_stats)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        board = self._board()
        by_id = {}
        for r in candidate_replicas:
            board.observe(r.replica_id, r.routing_stats)
            by_id[r.replica_id] = r
        if request_tokens(pending_request) is None:  # stats, info, abort: anywhere, Serve's choice
            return [candidate_replicas]
        return [[by_id[r] for r in rank] for rank in board.rank(by_id)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        tokens = request_tokens(pending_request)
        if tokens is None:
            return
        board = self._board()
        blocks = -(-(tokens + 1) // board.block_size(replica_id))
        board.routed(replica_id, blocks)
        request = getattr(pending_request.args[0], "request_id", "?")
        self.decisions.append((request, replica_id.unique_id, board.score(replica_id)
                               if board.fresh(replica_id) else float("nan")))


def router_deployment_options(settings: Any) -> dict[str, Any]:
    """The Router deployment's `request_router_config` option for a RoutingSettings."""
    from ray.serve.config import RequestRouterConfig

    if not settings.kv_aware:
        return {"request_router_config": RequestRouterConfig(
            request_routing_stats_period_s=settings.stats_period_s,
            request_routing_stats_timeout_s=settings.stats_timeout_s)}
    return {"request_router_config": RequestRouterConfig(
        request_router_class=ROUTER_CLASS, request_router_kwargs={"stale_after_s": settings.stale_after_s},
        request_routing_stats_period_s=settings.stats_period_s,
        request_routing_stats_timeout_s=settings.stats_timeout_s)}
