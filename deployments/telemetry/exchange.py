"""The expert exchange as an engine replica's telemetry sees it: `TimedDispatcher`, composed around
the transport's dispatcher when the engine is built (`deployments.serving.engine_builder`), times
every MoE layer's exchange; `shard_health` tells which expert shards answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from cluster.model.dispatch import Dispatcher
from deployments.telemetry.signals import ExchangeTotals

logger = logging.getLogger("ray.serve")


class TimedDispatcher(Dispatcher):
    """A dispatcher that times each exchange of the one it wraps: `observe(seconds)` per exchange
    (the latency histogram; its errors are swallowed), `totals` (exchanges and seconds since start,
    replaced as one value, so a reader on another thread sees a consistent pair) and `healthy` (the
    outcome of the latest exchange: False from a failed one until one succeeds)."""

    def __init__(self, inner: Dispatcher, observe: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self._observe = observe
        self._clock = clock
        self.totals = ExchangeTotals()
        self.healthy = True

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        start = self._clock()
        try:
            out = self.inner.dispatch(layer, hidden, topk_ids, topk_weights)
        except BaseException:
            self.healthy = False
            raise
        finally:
            seconds = self._clock() - start
            self.totals = ExchangeTotals(self.totals.count + 1, self.totals.seconds + seconds)
            if self._observe is not None:
                try:
                    self._observe(seconds)
                except Exception:  # noqa: BLE001 - metrics never fail a step
                    logger.debug("metrics: exchange latency failed", exc_info=True)
        self.healthy = True
        return out

    def token_counts(self) -> dict[int, torch.Tensor]:
        return self.inner.token_counts()

    def graph_safe(self) -> bool:
        # In-process experts on CUDA: decode steps replay as graphs, and their exchanges (inside the
        # graph, on the device) are not timed; only eager steps' are.
        return self.inner.graph_safe()

    def recover(self) -> None:
        self.inner.recover()

    def close(self) -> None:
        self.inner.close()


def shard_health(timed: TimedDispatcher, ping_timeout_s: float = 2.0) -> dict[int, bool] | None:
    """Expert shard health per rank as an engine's dispatcher sees it, or None where the transport
    has no shards of its own (`local`: the experts live in the engine's process):
    `shard_health()` of the wrapped dispatcher if it has one; Ray actor shards (`shards`, each with
    `ping`) that answer a ping within `ping_timeout_s`; else the ranks of its placement, up while
    its latest exchange succeeded (the DeepSpeed transport)."""
    dispatcher: Any = timed.inner
    report = getattr(dispatcher, "shard_health", None)
    if callable(report):
        return {int(rank): bool(up) for rank, up in dict(report()).items()}
    shards = getattr(dispatcher, "shards", None)
    if shards and all(hasattr(getattr(s, "ping", None), "remote") for s in shards):
        import ray

        refs = [s.ping.remote() for s in shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ping_timeout_s)
        health = {}
        for rank, ref in enumerate(refs):
            try:
                health[rank] = ref in ready and bool(ray.get(ref, timeout=0))
            except Exception:  # noqa: BLE001 - a dead actor or a failed ping: down
                health[rank] = False
        return health
    ranks = getattr(getattr(dispatcher, "placement", None), "num_ranks", None)
    if shards is None and isinstance(ranks, int) and ranks > 0:
        return dict.fromkeys(range(ranks), timed.healthy)
    return None


def num_shards(timed: TimedDispatcher) -> int:
    """Ranks of the wrapped dispatcher's expert placement (1 without one)."""
    ranks = getattr(getattr(timed.inner, "placement", None), "num_ranks", None)
    return ranks if isinstance(ranks, int) and ranks > 0 else 1
