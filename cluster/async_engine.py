"""The engine for a server: a background thread steps it; callers add requests, iterate their
outputs as they are produced, and abort them (a client gone, a deadline passed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster.sequence import ImageRows, RequestOutput
from cluster.stats import EngineStats, KVLoad


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; requests in flight get this."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self.load: KVLoad = engine.kv_load()  # refreshed under the lock at every change; read without it
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       images: ImageRows | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative output after each step that advanced it; leaving the
        loop early (or being cancelled) aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if self._error is not None:
                raise EngineDeadError(f"engine stopped: {self._error!r}")
            self.engine.add_request(request_id, prompt_token_ids, params, images)  # raises on bad input
            self._queues[request_id] = (loop, queue)
            self.load = self.engine.kv_load()
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine stopped: {item!r}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._queues.pop(request_id, None)
            self.engine.abort(request_id)
            self.load = self.engine.kv_load()

    @property
    def alive(self) -> bool:
        """False once the loop stopped on an internal error (or was shut down)."""
        return self._error is None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    def check_integrity(self) -> None:
        with self._lock:
            self.engine.check_integrity()

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.engine.close()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                    self.load = self.engine.kv_load()
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                    self._error = exc
                    for loop, queue in self._queues.values():
                        loop.call_soon_threadsafe(queue.put_nowait, exc)
                    self._queues.clear()
                    return
                for out in outputs:
                    target = self._queues.get(out.request_id)
                    if target is not None:
                        target[0].call_soon_threadsafe(target[1].put_nowait, out)
                        if out.finished:
                            del self._queues[out.request_id]
