"""Running a batch of requests on a synchronous `LLMEngine` until they finish (the offline API and
the expert group's engines), with the outputs made by `OutputAggregator`s."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.output_aggregator import OutputAggregator, OutputKind, RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.model.image_rows import ImageRows


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    images: ImageRows | None = None
    cache_salt: str | None = None  # prefix cache isolation (`LLMEngine.add_request`)


def run_requests(engine: LLMEngine, requests: Sequence[EngineRequest], kind: OutputKind,
                 lock: contextlib.AbstractContextManager | None = None) -> Iterator[RequestOutput]:
    """Adds every request, then steps the engine until they finish, yielding their outputs of
    `kind` as they come (each of a request's `n` choices its own, told apart by `index`). A stop
    string found in a choice's text aborts that choice in the engine; leaving the iterator early
    aborts the requests still running. `lock` is held around each engine call."""
    guard = lock if lock is not None else contextlib.nullcontext()
    streams: dict[tuple[str, int], OutputAggregator] = {}
    try:
        for r in requests:
            with guard:
                engine.add_request(r.request_id, r.prompt_token_ids, r.params, r.images, r.cache_salt)
            for i in range(r.params.n):
                streams[(r.request_id, i)] = OutputAggregator(r.request_id, r.params, engine.stop.tokenizer, kind,
                                                              index=i)
        while any(not s.finished for s in streams.values()):
            outputs = []
            with guard:
                for delta in engine.step():
                    stream = streams.get((delta.request_id, delta.index))
                    if stream is None:
                        continue  # a request someone added to the engine directly
                    out = stream.add(delta)
                    if stream.must_abort:
                        engine.abort(delta.request_id, delta.index)
                    if out is not None:
                        outputs.append(out)
            yield from outputs  # outside the lock
    finally:
        with guard:
            for rid in dict.fromkeys(rid for (rid, _), stream in streams.items() if not stream.finished):
                engine.abort(rid)
