"""`/v1/completions`: text or token-id prompts, whole or streamed (SSE), with vLLM's
`return_token_ids` and OpenAI's legacy logprobs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from deployments.api.openai_protocol import CompletionRequest
from deployments.api.outputs import SSE_DONE, TokenText, completion_logprobs, sse, usage
from deployments.errors import APIError, to_api_error
from deployments.frontend.engine_client import EngineStream, merged
from deployments.frontend.ingress_core import IngressCore


class Job(ABC):
    """Started engine streams of one API request; `cancel` aborts them all (idempotent)."""

    CHUNK_OBJECT: str  # the "object" of a stream chunk

    def __init__(self, rid: str, streams: list[EngineStream], model: str, include_usage: bool) -> None:
        self.rid, self.streams, self.model, self.include_usage = rid, streams, model, include_usage
        self.created = int(time.time())

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    def completion_tokens(self) -> int:
        """Output tokens of every choice (once the streams finished)."""
        return sum(len(s.result().token_ids) for s in self.streams)

    @abstractmethod
    async def collect(self) -> dict[str, Any]:
        """The whole response body, once every stream finished."""

    @abstractmethod
    def prompt_tokens(self) -> int:
        """Prompt tokens the usage counts."""

    def cached_tokens(self) -> int:
        """Of the prompt tokens, those the prefix cache gave: each prompt's first choice's (its
        other choices are requests of their own, which find the same prefix cached or more)."""
        per_prompt = max(len(self.streams) // max(self.num_prompts(), 1), 1)
        return sum(s.result().num_cached_tokens or 0 for s in self.streams[::per_prompt])

    def num_prompts(self) -> int:
        return 1

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens(), self.completion_tokens(), self.cached_tokens())

    @abstractmethod
    def _choice_events(self) -> AsyncIterator[str]:
        """The choices' server-sent events, as the streams make them."""

    def _chunk(self, choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.rid, "object": self.CHUNK_OBJECT, "created": self.created,
                                 "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = use
        return chunk

    async def events(self) -> AsyncIterator[str]:
        """The response as server-sent events: the choices', the usage if asked, an error in-band once the
        stream has started, then [DONE]."""
        try:
            async for event in self._choice_events():
                yield event
            if self.include_usage:
                yield sse(self._chunk([], self.usage()))
        except APIError as exc:
            yield sse(exc.body())
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(to_api_error(exc).body())
        finally:
            self.cancel()
        yield SSE_DONE


class CompletionJob(Job):
    CHUNK_OBJECT = "text_completion"

    def __init__(self, core: IngressCore, body: CompletionRequest, rid: str, streams: list[EngineStream],
                 prompts: list[list[int]], model: str) -> None:
        super().__init__(rid, streams, model, body.include_usage)
        self.body, self.prompts, self.tokens = body, prompts, TokenText(core.tokenizer)

    def _prompt(self, index: int) -> list[int]:
        return self.prompts[index // self.body.n]

    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def num_prompts(self) -> int:
        return len(self.prompts)

    async def collect(self) -> dict[str, Any]:
        try:
            async for _ in merged(self.streams):
                pass
        finally:
            self.cancel()
        choices = []
        for i, stream in enumerate(self.streams):
            out = stream.result()
            choice: dict[str, Any] = {
                "index": i, "text": out.text, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                "logprobs": completion_logprobs(self.tokens, out.logprobs, 0) if out.logprobs is not None else None}
            if self.body.return_token_ids:
                choice["prompt_token_ids"] = self._prompt(i)
                choice["token_ids"] = list(out.token_ids)
            choices.append(choice)
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def _choice_events(self) -> AsyncIterator[str]:
        chars = [0] * len(self.streams)  # text sent per choice: the logprobs' text offsets
        async for i, out in merged(self.streams):  # text deltas
            offset, chars[i] = chars[i], chars[i] + len(out.text)
            choice: dict[str, Any] = {
                "index": i, "text": out.text,
                "logprobs": completion_logprobs(self.tokens, out.logprobs, offset)
                if out.logprobs is not None else None,
                "finish_reason": out.finish_reason if out.finished else None,
                "stop_reason": out.stop_reason if out.finished else None}
            if self.body.return_token_ids:
                choice["token_ids"] = list(out.token_ids)
                if out.prompt_token_ids is not None:  # the first delta
                    choice["prompt_token_ids"] = self._prompt(i)
            yield sse(self._chunk([choice]))


async def start_completion(core: IngressCore, body: CompletionRequest) -> CompletionJob:
    body.unsupported()
    info = await core.check_model(body.model)
    # Off the event loop: a long prompt must not stall every other request of this replica.
    prompts = await asyncio.to_thread(core.encode_completion_prompts, body.prompt, info)
    core.check_n(body.n, len(prompts))
    max_tokens = core.max_tokens(body.max_tokens, [len(p) for p in prompts], info,
                                 core.config.default_completion_tokens)
    params = core.sampling_params(body, max_tokens, body.logprobs)
    grammar = await core.grammar(lambda grammars: grammars.for_completion(body.response_format))
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    rid, streams = await core.start("cmpl", prompts, params, body.n, cache_salt=body.cache_salt)
    return CompletionJob(core, body, rid, streams, prompts, info.name)
