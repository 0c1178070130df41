"""KV-aware request routing to EngineServer replicas: a Ray Serve custom request router.

Every engine replica reports its KV state through `EngineServer.record_routing_stats()`, which Serve's
controller calls every `routing.stats_period_s` (0.5 s by default) and broadcasts to every
DeploymentHandle when it changes; a report carries a sequence number and the replica's clock, so
each one is a change. In each handle (the ingress replicas, the benchmark's driver), this request router
ranks the replicas by their free KV blocks net of what the prompts already there will still take,
minus what this handle routed to them since their last report (a burst must not herd onto the
replica that looked emptiest a moment ago). Replicas without a fresh report (just started, or
slower to report than `stale_after_s`) come last, together, where Serve's queue-length choice
decides. Each rank holds one replica, so a full replica (max_ongoing_requests) falls through to
the next.

Prefix-aware: the router remembers the block keys of the prompts it sent to each replica
(`PrefixMemory`; the keys are the replicas' own prefix-cache keys), and puts first the replica
that was sent the longest prefix of the new prompt, as long as that replica has room for the
rest of the prompt and is not more than `max_imbalance` requests busier than the least busy one;
otherwise (and for prompts nobody was sent the start of) the KV order above decides. A
conversation's next turn thereby lands where its earlier turns are cached.

Configured on the EngineServer deployment (deployments/app.py):

    request_router_config=RequestRouterConfig(
        request_router_class="deployments.serving.request_router:KVAwareRequestRouter",
        request_router_kwargs={"stale_after_s": 3.0},
        request_routing_stats_period_s=0.5)
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.engine.block_manager import blocks_needed
from cluster.engine.prefix_hash import block_keys
from deployments.serving.prefix_memory import PrefixMemory

REQUEST_ROUTER_CLASS = "deployments.serving.request_router:KVAwareRequestRouter"
# A request routed this long before a report's clock is taken to be in it; the margin covers
# the hop to the replica (a request still in flight is counted twice for a moment, never zero).
IN_REPORT_MARGIN_S = 0.05
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_IMBALANCE = 8  # requests in flight a prefix's replica may have above the least busy one
ReplicaKey = TypeVar("ReplicaKey", bound=Hashable)  # Serve's ReplicaID; any key in unit tests


@dataclass
class _Routed:
    at: float  # this handle's clock
    blocks: float


@dataclass
class _Replica:
    seq: Any = None
    stats: Mapping[str, Any] = field(default_factory=dict)
    seen_at: float = 0.0  # this handle's clock when the report was first seen
    routed: deque = field(default_factory=deque)  # _Routed entries since the report


class KVScoreboard(Generic[ReplicaKey]):
    """The routing decision, apart from Serve's machinery (unit-tested on its own)."""

    def __init__(self, stale_after_s: float = 3.0, clock: Callable[[], float] = time.time,
                 max_imbalance: int = DEFAULT_MAX_IMBALANCE) -> None:
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.max_imbalance = max_imbalance
        self._replicas: dict[ReplicaKey, _Replica] = {}
        self.prefixes: PrefixMemory[ReplicaKey] = PrefixMemory()

    def observe(self, replica: ReplicaKey, stats: Mapping[str, Any] | None) -> None:
        """Takes a replica's latest report (the same one again is a no-op)."""
        now = self.clock()
        state = self._replicas.setdefault(replica, _Replica())
        if stats and stats.get("seq") is not None and stats.get("seq") != state.seq:
            state.seq, state.stats, state.seen_at = stats.get("seq"), stats, now
            reported = float(stats.get("time", now))
            while state.routed and state.routed[0].at <= reported - IN_REPORT_MARGIN_S:
                state.routed.popleft()
        while state.routed and state.routed[0].at < now - self.stale_after_s:
            state.routed.popleft()  # whatever report it was in, it is older than any fresh one

    def fresh(self, replica: ReplicaKey) -> bool:
        state = self._replicas.get(replica)
        if state is None or state.seq is None:
            return False
        # by this handle's clock (first sight of the report), so clock skew between nodes cannot
        # make a report look fresh or stale
        return self.clock() - state.seen_at <= self.stale_after_s

    def score(self, replica: ReplicaKey) -> float:
        """Free KV blocks net of reported prompts and of what was routed here since the report."""
        state = self._replicas[replica]
        return float(state.stats.get("free_blocks", 0)) - sum(e.blocks for e in state.routed)

    def load(self, replica: ReplicaKey) -> int:
        state = self._replicas[replica]
        routed = sum(1 for e in state.routed if e.blocks)
        return int(state.stats.get("running", 0)) + int(state.stats.get("waiting", 0)) + routed

    def rank(self, replicas: Iterable[ReplicaKey], keys: Sequence[bytes] = (), tokens: int = 0
             ) -> list[list[ReplicaKey]]:
        """Fresh replicas one per rank, most free blocks first (ties: fewer sequences, then random);
        the others together in a last rank. Before all of them, in a rank of its own, the replica
        sent the longest prefix of the prompt's block `keys` (`prefix_choice`), judged by its last
        report even when that is stale: a late report must not break a conversation's affinity."""
        known: list[ReplicaKey] = []
        unknown: list[ReplicaKey] = []
        for r in replicas:
            (known if self.fresh(r) else unknown).append(r)
        random.shuffle(known)
        known.sort(key=lambda r: (-self.score(r), self.load(r)))
        reported = known + [r for r in unknown if self._replicas[r].seq is not None]
        first = self.prefix_choice(reported, keys, tokens) if keys else None
        if first is not None:
            (known if first in known else unknown).remove(first)
        ranks = [[first]] if first is not None else []
        ranks += [[r] for r in known]
        if unknown:
            ranks.append(unknown)
        return ranks

    def prefix_choice(self, ranked: list[ReplicaKey], keys: Sequence[bytes], tokens: int) -> ReplicaKey | None:
        """Of the `ranked` replicas (KV order), the one sent the longest prefix of `keys` that
        has room for the rest of the prompt and at most `max_imbalance` more requests than the
        least busy; None when no such replica was sent even the first block."""
        if not ranked:
            return None
        least = min(self.load(r) for r in ranked)
        best, best_match = None, 0
        for r in ranked:  # in KV order: of equal matches, the one with more room
            match = self.prefixes.matched(r, keys)
            if match <= best_match or self.load(r) > least + self.max_imbalance:
                continue
            if self.score(r) < self.blocks_of(tokens, r) - match:
                continue  # no room for the rest of the prompt there
            best, best_match = r, match
        return best

    def sent(self, replica: ReplicaKey, keys: Sequence[bytes]) -> None:
        """A prompt with block `keys` went to `replica`: its prefix is (soon) cached there."""
        state = self._replicas.get(replica)
        total = state.stats.get("total_blocks") if state else None
        self.prefixes.remember(replica, keys, int(total) if total else None)

    def routed(self, replica: ReplicaKey, blocks: float) -> _Routed:
        entry = _Routed(self.clock(), blocks)
        self._replicas.setdefault(replica, _Replica()).routed.append(entry)
        return entry

    def move(self, entry: _Routed, replica: ReplicaKey) -> _Routed:
        """A request counted at one replica went to another."""
        blocks, entry.blocks = entry.blocks, 0.0
        moved = _Routed(entry.at, blocks)
        self._replicas.setdefault(replica, _Replica()).routed.append(moved)
        return moved

    def block_size(self, replica: ReplicaKey) -> int:
        state = self._replicas.get(replica)
        size = state.stats.get("block_size") if state else None
        return int(size) if size else DEFAULT_BLOCK_SIZE

    def blocks_of(self, tokens: int, replica: ReplicaKey) -> int:
        return blocks_needed(tokens + 1, self.block_size(replica))  # the prompt and its first token


def request_keys(pending_request: PendingRequest, block_size: int) -> list[bytes]:
    """The block keys of a `generate` call's prompt, as the engine's prefix cache makes them
    (token ids, image pixel hashes, cache salt)."""
    request = pending_request.args[0] if pending_request.args else None
    prompt = getattr(request, "prompt_token_ids", None)
    if prompt is None:
        return []
    return block_keys(list(prompt), block_size, getattr(request, "images", None), getattr(request, "cache_salt", None))


def request_tokens(pending_request: PendingRequest | None) -> int | None:
    """Prompt tokens of a `generate` call (its GenerateRequest), None for any other method."""
    if pending_request is None or pending_request.metadata.call_method != "generate" or not pending_request.args:
        return None
    prompt = getattr(pending_request.args[0], "prompt_token_ids", None)
    return len(prompt) if prompt is not None else None


class KVAwareRequestRouter(FIFOMixin, RequestRouter):
    """Routes each `generate` call to the engine replica it sent the longest prefix of the prompt
    (within `max_imbalance`, with room), else to the one with the most free KV blocks.

    A burst is counted as it is routed: the choice itself counts the request at the replica it
    ranked first (the routing tasks of a burst all choose before the first request is sent), and
    `on_request_routed` moves the count if the request went elsewhere (that replica was full, or
    FIFO order gave the choice to an older request: calls made while serving one ingress request
    share its internal id, which FIFOMixin needs to tell them apart)."""

    def initialize_state(self, stale_after_s: float = 3.0, prefix_aware: bool = True,
                         max_imbalance: int = DEFAULT_MAX_IMBALANCE, **kwargs: Any) -> None:
        self.board: KVScoreboard[ReplicaID] = KVScoreboard(stale_after_s, max_imbalance=max_imbalance)
        self.prefix_aware = prefix_aware
        self._counted: OrderedDict[int, tuple[ReplicaID, _Routed, float]] = OrderedDict()
        self.decisions: deque[tuple[str, str]] = deque(maxlen=1024)  # (request id, replica id)

    def _board(self) -> KVScoreboard[ReplicaID]:
        if not hasattr(self, "board"):  # initialize_state is Serve's to call; never fail without it
            self.initialize_state()
        return self.board

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        board = self._board()
        for r in replicas:  # a broadcast: the reports are seen as they arrive
            board.observe(r.replica_id, r.routing_stats)
        board.prefixes.forget(r.replica_id for r in replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        board = self._board()
        by_id = {}
        for r in candidate_replicas:
            board.observe(r.replica_id, r.routing_stats)
            by_id[r.replica_id] = r
        tokens = request_tokens(pending_request)
        if pending_request is None or tokens is None:  # stats, info, abort: anywhere, Serve's choice
            # Shuffled: Serve takes the shortest queue, the first of equals, so idle replicas would
            # otherwise always give the same one.
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        keys = request_keys(pending_request, board.block_size(next(iter(by_id)))) if self.prefix_aware else []
        ranks = board.rank(by_id, keys, tokens)
        if len(ranks[0]) == 1:  # count it where it will most likely go (see the class doc)
            self._count(pending_request, ranks[0][0], tokens)
        return [[by_id[r] for r in rank] for rank in ranks]

    def _count(self, pending_request: PendingRequest, replica: ReplicaID, tokens: int) -> None:
        board, key = self.board, id(pending_request)
        previous = self._counted.pop(key, None)
        if previous is not None:  # chosen again (a retry): move its count
            entry = previous[1] if previous[0] == replica else board.move(previous[1], replica)
        else:
            entry = board.routed(replica, board.blocks_of(tokens, replica))
        now = board.clock()
        self._counted[key] = (replica, entry, now)
        while self._counted and next(iter(self._counted.values()))[2] < now - 2 * board.stale_after_s:
            self._counted.popitem(last=False)  # cancelled before routing: forgotten

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        tokens = request_tokens(pending_request)
        if tokens is None:
            return
        board = self._board()
        counted = self._counted.pop(id(pending_request), None)
        if counted is None:
            board.routed(replica_id, board.blocks_of(tokens, replica_id))
        elif counted[0] != replica_id:
            board.move(counted[1], replica_id)
        if self.prefix_aware:
            board.sent(replica_id, request_keys(pending_request, board.block_size(replica_id)))
        self.decisions.append((getattr(pending_request.args[0], "request_id", "?"), replica_id.unique_id))


def request_router_options(settings: Any) -> dict[str, Any]:
    """The EngineServer deployment's `request_router_config` option for a RoutingSettings."""
    from ray.serve.config import RequestRouterConfig

    if not settings.kv_aware:
        return {"request_router_config": RequestRouterConfig(
            request_routing_stats_period_s=settings.stats_period_s,
            request_routing_stats_timeout_s=settings.stats_timeout_s)}
    return {"request_router_config": RequestRouterConfig(
        request_router_class=REQUEST_ROUTER_CLASS,  # type: ignore[arg-type]  # ray: `**kwargs: dict[str, Any]`
        request_router_kwargs={"stale_after_s": settings.stale_after_s, "prefix_aware": settings.prefix_aware,
                               "max_imbalance": settings.prefix_max_imbalance},
        request_routing_stats_period_s=settings.stats_period_s,
        request_routing_stats_timeout_s=settings.stats_timeout_s)}
