"""The ingress side of the engine hop: open a streaming call per engine request, see its first
output (so refusals become 4xx before any response is started), and cancel it on every early exit,
which aborts the request at the engine and frees its KV blocks.

The engine server sends what each engine step made (token ids, no text); the text is made here, once, by
the request's `OutputAggregator`, which also finds stop strings: a stop string ends the stream here
and cancels the engine call, so the engine aborts the request and frees its blocks.

An engine replica that dies (killed, its node lost) fails the calls it was running. A call that
had received nothing from it yet (queued or prefilling there) is sent again, to another replica
(Serve's router drops a replica whose call failed with ActorDiedError), up to `RETRIES_BEFORE_OUTPUT`
times: the client sees nothing of it. A call that had received outputs ends with `Unavailable`
(503 / UNAVAILABLE, Retry-After): the tokens already sent cannot be taken back, so the client
retries the whole request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from cluster.engine.output_aggregator import OutputAggregator, OutputKind, RequestOutput
from cluster.model.tokenizer import Tokenizer
from deployments.errors import Unavailable, replica_lost, to_api_error
from deployments.serving.request import GenerateRequest, ModelInfo
from deployments.telemetry.instrumentation import observe_stream

if TYPE_CHECKING:
    from cluster.engine.stats import EngineStats


logger = logging.getLogger("ray.serve")

RETRIES_BEFORE_OUTPUT = 2  # calls sent again after their replica died before it sent anything


class _TextDeltas:
    """An engine call's outputs as text deltas (`OutputKind.DELTA`); `call()` opens the call (again,
    after its replica died before sending anything)."""

    def __init__(self, call: Callable[[], Any], outputs: OutputAggregator, retry_after_s: int) -> None:
        self._call = call
        self._gen = call()  # a Serve DeploymentResponseGenerator
        self._outputs = outputs
        self._retry_after_s = retry_after_s
        self._received = 0  # engine outputs received
        self._retries_left = RETRIES_BEFORE_OUTPUT

    def __aiter__(self) -> _TextDeltas:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._outputs.finished:
            out = self._outputs.add(await self._next_output())
            if self._outputs.must_abort:  # a stop string: the engine still runs the request
                self.cancel()
            if out is not None:
                return out
        raise StopAsyncIteration

    async def _next_output(self) -> Any:
        while True:
            try:
                item = await self._gen.__anext__()
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                if self._received or not self._retries_left:
                    raise Unavailable(f"the engine replica running this request stopped after {self._received} "
                                      "outputs; retry the request", retry_after_s=self._retry_after_s) from exc
                self._retries_left -= 1
                logger.warning("engine replica lost before request %s started; sending it again",
                               self._outputs.request_id)
                self._gen = self._call()
                continue
            self._received += 1
            return item

    def cancel(self) -> None:
        with contextlib.suppress(Exception):
            self._gen.cancel()


class EngineStream:
    """One engine request's text deltas; `result()` is the whole answer once it finished."""

    def __init__(self, generator: Any, outputs: OutputAggregator, retry_after_s: int,
                 on_close: Callable[[], None] | None = None) -> None:
        self._gen = generator  # the request's _TextDeltas, observed by its metrics tracker
        self._outputs = outputs
        self._first: RequestOutput | None = None
        self._retry_after_s = retry_after_s
        self._on_close = on_close  # runs once, when the stream finishes or is cancelled
        self._done = False

    def _finish(self) -> None:
        self._done = True
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def prime(self) -> None:
        try:
            self._first = await self._gen.__anext__()
        except StopAsyncIteration:
            self._finish()
            raise to_api_error(RuntimeError("the engine ended a request without output")) from None
        except BaseException as exc:
            self.cancel()  # a refused request is gone already; a cancelled caller must not leave it running
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                raise
            raise to_api_error(exc, self._retry_after_s) from None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
                if first.finished:
                    self._finish()
                    return
            try:
                async for out in self._gen:
                    yield out
                    if out.finished:
                        self._finish()
                        return
            except Exception as exc:
                raise to_api_error(exc, self._retry_after_s) from None
            self._finish()
        finally:
            if not self._done:
                self.cancel()

    def result(self) -> RequestOutput:
        """Everything so far: the whole answer once the stream finished."""
        return self._outputs.cumulative()

    def cancel(self) -> None:
        """Idempotent, and a no-op once the stream finished; Serve forwards it to the engine
        replica, whose generator then aborts the request."""
        if self._done:
            return
        self._finish()
        with contextlib.suppress(Exception):
            self._gen.cancel()


class EngineClient:
    def __init__(self, engine: Any, tokenizer: Tokenizer, retry_after_s: int) -> None:
        self._engine = engine  # DeploymentHandle of the EngineServer deployment
        self._tokenizer = tokenizer
        self._retry_after_s = retry_after_s

    async def open(self, requests: Sequence[GenerateRequest],
                   on_close: Sequence[Callable[[], None]] | None = None) -> list[EngineStream]:
        """Starts every request, waits for each one's first output; on any failure cancels all.
        `on_close[i]` runs once when stream i finishes or is cancelled."""
        closers = list(on_close) if on_close is not None else [None] * len(requests)
        streams = [self._stream(r, c) for r, c in zip(requests, closers, strict=True)]
        try:
            await asyncio.gather(*(s.prime() for s in streams))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams

    def _stream(self, request: GenerateRequest, on_close: Callable[[], None] | None) -> EngineStream:
        outputs = OutputAggregator(request.request_id, request.params, self._tokenizer, OutputKind.DELTA)
        deltas = _TextDeltas(lambda: self._engine.options(stream=True).generate.remote(request), outputs,
                             self._retry_after_s)
        return EngineStream(observe_stream(deltas), outputs, self._retry_after_s, on_close)  # metrics

    async def info(self, timeout_s: float) -> ModelInfo:
        """The served model (`EngineServer.info`)."""
        return await asyncio.wait_for(self._engine.info.remote(), timeout_s)

    async def stats(self, timeout_s: float) -> EngineStats:
        """One engine replica's latest published stats (`EngineServer.stats`)."""
        return await asyncio.wait_for(self._engine.stats.remote(), timeout_s)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def merged(streams: Sequence[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index; leaving early (or
    an error in any stream) cancels them all."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            s.cancel()
