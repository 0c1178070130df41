"""An engine replica's telemetry, in one direction: the engine publishes, this reads.

- When the engine is built, `EngineInstrumentation.timed(dispatcher)` composes a `TimedDispatcher`
  around the transport's dispatcher (`deployments.serving.engine_builder`): every expert exchange
  is timed as it happens.
- Once the engine loop runs, `start(engine)` polls the snapshot it publishes after every step, add
  and abort (`AsyncEngine.snapshot`: stats, KV load, expert token counts, re-form times) and the
  shard health on a daemon thread, and records them (`EngineMetrics`). Nothing here takes the
  engine's lock or reads its private state, so nothing here waits for a step.
- `autoscaling_stats()` is what `EngineServer.record_autoscaling_stats()` returns: the signals of
  `deployments.telemetry.signals` from the latest snapshot and the exchange totals.

Metrics never fail a replica: a poll that raises is logged and the next one runs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

from deployments.telemetry.metrics import MetricSet
from deployments.telemetry.recorders import EngineMetrics
from deployments.telemetry.signals import ExchangeTotals, ExpertSignals, kv_signals, routed_pairs

if TYPE_CHECKING:
    from cluster.engine.stats import EngineSnapshot
    from cluster.model.dispatch import Dispatcher
    from deployments.telemetry.exchange import TimedDispatcher

logger = logging.getLogger("ray.serve")

POLL_INTERVAL_S = 5.0  # Ray exports every ~10 s; polling faster only costs CPU


class PublishesSnapshots(Protocol):
    """What the instrumentation reads of an engine (`AsyncEngine`)."""

    @property
    def snapshot(self) -> EngineSnapshot: ...


class EngineInstrumentation:
    """`timed()` while the engine is built, `start()` once it runs, `stop()` on shutdown."""

    def __init__(self, transport: str, metrics: MetricSet | None = None) -> None:
        self.metrics = EngineMetrics(metrics, transport=transport)
        self._dispatcher: TimedDispatcher | None = None
        self._engine: PublishesSnapshots | None = None
        self._expert_signals = ExpertSignals()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def timed(self, dispatcher: Dispatcher) -> Dispatcher:
        """The dispatcher to build the engine with: `dispatcher`, each exchange timed."""
        from deployments.telemetry.exchange import TimedDispatcher, num_shards

        self._dispatcher = TimedDispatcher(dispatcher, self.metrics.experts.observe_exchange)
        self._expert_signals = ExpertSignals(num_shards(self._dispatcher))
        return self._dispatcher

    def start(self, engine: PublishesSnapshots, interval_s: float = POLL_INTERVAL_S) -> None:
        """Reads `engine`'s snapshots from now on: recorded every `interval_s` on a daemon thread."""
        self._engine = engine
        if self._thread is not None or interval_s <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - metrics never take a replica down
                    logger.warning("engine metrics poll failed", exc_info=True)

        self._thread = threading.Thread(target=loop, name="moe-cluster-metrics", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Records the latest snapshot and the shard health."""
        if self._engine is None:
            return
        self.metrics.observe(self._engine.snapshot)
        if self._dispatcher is not None:
            from deployments.telemetry.exchange import shard_health

            health = shard_health(self._dispatcher)
            if health:
                self.metrics.experts.set_shards_health(health)

    def autoscaling_stats(self) -> dict[str, float]:
        """KV use, waiting and running sequences of the latest snapshot (never waits for a step);
        from the second report on, the expert load and exchange latency since the previous one."""
        if self._engine is None:
            return {}
        snapshot = self._engine.snapshot
        exchanges = self._dispatcher.totals if self._dispatcher is not None else ExchangeTotals()
        return {**kv_signals(snapshot.load),
                **self._expert_signals.update(routed_pairs(snapshot.expert_tokens), exchanges, time.monotonic())}

    def stop(self) -> None:
        self._stop.set()
