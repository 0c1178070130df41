"""The engine for a server: a background thread steps it; callers add requests, iterate their
outputs as they are produced, and abort them (a client gone, a deadline passed)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.output_aggregator import OutputAggregator, OutputKind, RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import EngineOutput
from cluster.engine.stats import EngineSnapshot, EngineStats
from cluster.errors import InvalidSamplingParamsError
from cluster.model.image_rows import ImageRows


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; requests in flight get this."""


class _Refused:
    """An add_request that the engine refused (bad input), handed back to the caller's stream."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class AsyncEngine:
    """The engine loop runs on its own thread and holds `_lock` while it steps. Callers on the
    event loop never take that lock to add or abort a request (a step can take seconds, and the
    event loop also carries every other stream's outputs): they put the request in an inbox that
    the loop drains between steps, and the answer (outputs, or the refusal of bad input) comes
    back on the request's own queue. `stats()` and `check_integrity()` take the lock (and drain
    the inbox first, so they see every add and abort made before them: tests and tools). Servers
    read `snapshot` (stats, KV load, expert token counts), which the loop publishes after every
    step and drain and which is read without the lock, so it never waits for a step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Event()  # set when the inbox has something or on shutdown
        self._inbox: deque[tuple] = deque()  # ("add", ...) / ("abort", id), drained under the lock
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self.snapshot: EngineSnapshot = engine.snapshot()  # replaced under the lock at every change
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       images: ImageRows | None = None, output_kind: OutputKind = OutputKind.CUMULATIVE,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs with text, of `output_kind`: everything so far after each
        step that advanced it (the default), only what is new, or one at the end. Bad input raises
        the engine's RequestError before any output; a stop string ends the request here and aborts
        it in the engine; leaving the loop early (or being cancelled) aborts it too. Either way its
        blocks are freed."""
        outputs = OutputAggregator(request_id, params, self.engine.stop.tokenizer, output_kind)
        async with aclosing(self.stream(request_id, prompt_token_ids, params, images, cache_salt)) as deltas:
            async for delta in deltas:
                out = outputs.add(delta)
                if out is not None:
                    yield out
                if outputs.finished:
                    return  # closing `deltas` aborts a request that a stop string ended here

    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     images: ImageRows | None = None, cache_salt: str | None = None
                     ) -> AsyncGenerator[EngineOutput, None]:
        """Yields what each step made of the request: new token ids (no text), the prompt ids on
        the first output. Bad input raises the engine's RequestError before any output; leaving
        the loop before the finished output (or being cancelled) aborts the request and frees its
        blocks."""
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        if isinstance(params, SamplingParams) and params.n != 1:
            raise InvalidSamplingParamsError(f"n={params.n}: a stream carries one choice; send the choices as "
                                             "requests of their own (LLM.generate takes n)")
        queue: asyncio.Queue = asyncio.Queue()
        self._inbox.append(("add", request_id, list(prompt_token_ids), params, images, cache_salt,
                            asyncio.get_running_loop(), queue))
        self._work.set()
        if self._error is not None:  # the loop died meanwhile (it answers what it drained before dying)
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Refused):
                    finished = True
                    raise item.error
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
        """Never waits: the loop aborts it before its next step (or `stats()` does, if sooner)."""
        self._queues.pop(request_id, None)
        self._inbox.append(("abort", request_id))
        self._work.set()

    @property
    def alive(self) -> bool:
        """False once the loop stopped on an internal error (or was shut down)."""
        return self._error is None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stats(self) -> EngineStats:
        with self._lock:
            self._drain()
            return self.engine.stats()

    def check_integrity(self) -> None:
        with self._lock:
            self._drain()
            self.engine.check_integrity()

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=30)
        self.engine.close()

    def _drain(self) -> None:
        """Applies the inbox in order (called with the lock held)."""
        if not self._inbox:
            return
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "abort":
                self._queues.pop(item[1], None)
                self.engine.abort(item[1])
                continue
            _, request_id, prompt, params, images, cache_salt, loop, queue = item
            try:
                self.engine.add_request(request_id, prompt, params, images, cache_salt)
            except Exception as exc:  # noqa: BLE001 - bad input: the caller's stream raises it
                loop.call_soon_threadsafe(queue.put_nowait, _Refused(exc))
                continue
            self._queues[request_id] = (loop, queue)
        self.snapshot = self.engine.snapshot()

    def _loop(self) -> None:
        while True:
            self._work.clear()  # before draining: an add after this sets it again, so no wake-up is lost
            with self._lock:
                if self._stopped:
                    return
                try:
                    self._drain()
                    busy = self.engine.has_unfinished()
                    outputs = self.engine.step() if busy else []
                    if busy:
                        self.snapshot = self.engine.snapshot()
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                    self._fail(exc)
                    return
                for out in outputs:
                    target = self._queues.get(out.request_id)
                    if target is not None:
                        target[0].call_soon_threadsafe(target[1].put_nowait, out)
                        if out.finished:
                            self._queues.pop(out.request_id, None)
            if not busy:
                self._work.wait()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc  # first: a caller that adds after this raises at once (see generate)
        waiters = list(self._queues.values())
        self._queues.clear()
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "add":
                waiters.append((item[5], item[6]))
        for loop, queue in waiters:
            loop.call_soon_threadsafe(queue.put_nowait, exc)
