"""What the request router remembers of the prompts it sent: per engine replica, the content keys
of their full KV blocks (`cluster.engine.prefix_hash`, the keys the replicas' prefix caches use),
most recently sent last, forgetting the oldest past the replica's pool size.

It is a model of each replica's prefix cache, not a report from it: a replica may have evicted a
prefix the memory still holds (its pool was needed) or hold one another handle sent there. A
wrong guess costs a prefill, never a wrong answer. Why remembered rather than reported: see
docs/ARCHITECTURE.md (Prefix-aware routing).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, TypeVar

ReplicaKey = TypeVar("ReplicaKey", bound=Hashable)
DEFAULT_CAPACITY = 1 << 16  # keys per replica before its pool size is known


class PrefixMemory(Generic[ReplicaKey]):
    def __init__(self) -> None:
        self._sent: dict[ReplicaKey, OrderedDict[bytes, None]] = {}

    def remember(self, replica: ReplicaKey, keys: Sequence[bytes], capacity: int | None = None) -> None:
        """`keys` (a prompt's block keys, first block first) went to `replica`; its oldest keys past
        `capacity` (the replica's KV blocks) are forgotten, later blocks before the prefixes they extend."""
        sent = self._sent.setdefault(replica, OrderedDict())
        for key in reversed(keys):  # the prompt's first block ends most recent: it outlives the rest
            sent[key] = None
            sent.move_to_end(key)
        limit = capacity or DEFAULT_CAPACITY
        while len(sent) > limit:
            sent.popitem(last=False)

    def matched(self, replica: ReplicaKey, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first on, were sent to `replica` (chained keys: a key
        stands for its whole prefix)."""
        sent = self._sent.get(replica)
        if not sent:
            return 0
        n = 0
        for key in keys:
            if key not in sent:
                break
            n += 1
        return n

    def forget(self, keep: Iterable[ReplicaKey]) -> None:
        """Drops the replicas not in `keep` (gone from the deployment)."""
        alive = set(keep)
        for replica in [r for r in self._sent if r not in alive]:
            del self._sent[replica]

    def size(self, replica: ReplicaKey) -> int:
        return len(self._sent.get(replica, ()))
