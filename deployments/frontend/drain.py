"""A graceful stop (SIGTERM to `moe-cluster serve`): the ingress replicas stop admitting new
requests (503 / UNAVAILABLE with Retry-After, readiness 503, so a load balancer sends them
elsewhere) while the requests they hold run to their end, and the command shuts down once none is
left or the graceful timeout has passed.

Serve's own stop (`serve.delete`, `serve.shutdown`) lets in-flight requests finish too, but answers
new ones with 404 (the route is gone) and gives no way to tell every replica at once. So the
command starts a `DrainSignal` actor (named per application) before it deploys; each ingress
replica's `DrainWatch` reports its requests in flight to it every `POLL_S` and learns from the
answer whether to drain. Without the actor (a Serve config deploy, the tests' applications) the
watch finds nothing and the replica never drains."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ray.serve")

NAMESPACE = "moe-cluster"
POLL_S = 0.5
FRESH_S = 3 * POLL_S  # a report older than this is from a replica that has gone
LOOKUP_S = 5.0  # between lookups of a signal actor that was not there (the command starts it before deploying)


def signal_name(app_name: str) -> str:
    return f"{app_name}-drain"


class DrainSignal:
    """A Ray actor: whether the application drains, and what each ingress replica last reported."""

    def __init__(self) -> None:
        self._draining_since: float | None = None
        self._reports: dict[str, tuple[int, float]] = {}  # replica: (requests in flight, when)

    def start(self) -> None:
        if self._draining_since is None:
            self._draining_since = time.monotonic()

    def report(self, replica: str, in_flight: int) -> bool:
        """An ingress replica's requests in flight; returns whether it must drain."""
        self._reports[replica] = (in_flight, time.monotonic())
        return self._draining_since is not None

    def in_flight(self) -> int | None:
        """Requests in flight over the replicas that reported since the drain started (and lately);
        None until one has."""
        if self._draining_since is None:
            return None
        now = time.monotonic()
        fresh = [n for n, at in self._reports.values() if at >= self._draining_since and now - at <= FRESH_S]
        return sum(fresh) if fresh else None


def start_signal(app_name: str) -> Any:
    """The application's DrainSignal actor, owned by the caller (it goes when the caller's driver
    does)."""
    import ray

    actor = ray.remote(num_cpus=0)(DrainSignal).options(name=signal_name(app_name), namespace=NAMESPACE)
    return actor.remote()


def drain(signal: Any, timeout_s: float) -> int | None:
    """Tells the ingress replicas to drain and waits until they hold no request, or `timeout_s`;
    returns the requests still in flight (0: all finished; None: no replica reported)."""
    import ray

    ray.get(signal.start.remote(), timeout=10)
    deadline = time.monotonic() + timeout_s
    left = None
    while time.monotonic() < deadline:
        left = ray.get(signal.in_flight.remote(), timeout=10)
        if left == 0:
            return 0
        time.sleep(POLL_S / 2)
    return left


class DrainWatch:
    """In an ingress replica: a daemon thread that reports `in_flight()` to the application's
    DrainSignal and calls `on_drain()` once it says to drain."""

    def __init__(self, app_name: str, replica: str, in_flight: Callable[[], int], on_drain: Callable[[], None]) -> None:
        self._name, self._replica = signal_name(app_name), replica
        self._in_flight, self._on_drain = in_flight, on_drain
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drain-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        signal = None
        wait_s = POLL_S
        while not self._stop.wait(wait_s):
            try:
                if signal is None:
                    signal = ray.get_actor(self._name, namespace=NAMESPACE)
                wait_s = POLL_S
                if ray.get(signal.report.remote(self._replica, self._in_flight()), timeout=5):
                    self._on_drain()
            except ValueError:
                signal, wait_s = None, LOOKUP_S  # no signal actor: an application deployed otherwise
            except Exception:  # noqa: BLE001 - the signal's owner has gone: keep serving
                logger.debug("drain watch: signal unreachable", exc_info=True)
                signal, wait_s = None, LOOKUP_S

    def stop(self) -> None:
        self._stop.set()
