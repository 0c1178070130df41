"""`/v1/chat/completions`: messages encoded with mistral-common, reasoning returned as
`reasoning_content` apart from `content`, `[TOOL_CALLS]` output parsed into `tool_calls`; whole or
streamed (SSE)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from cluster.model.tokenizer import EncodedChat, Tokenizer
from deployments.api.chat_parser import ChatDelta, ChatParser
from deployments.api.openai_completions import Job
from deployments.api.openai_protocol import ChatCompletionRequest, NamedToolChoice
from deployments.api.outputs import TokenText, chat_logprobs, sse
from deployments.errors import BadRequest
from deployments.frontend.engine_client import EngineStream, merged
from deployments.frontend.ingress_core import IngressCore
from deployments.serving.request import ModelInfo


def prompt_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the prompt shows the model: a named choice shows only that tool, "none" none."""
    choice = body.tool_choice
    if choice is None or choice == "auto" or choice == "required":
        if choice == "required" and not body.tools:
            raise BadRequest("tool_choice 'required' needs tools", "tool_choice")
        return body.tools
    if choice == "none":
        return None
    assert isinstance(choice, NamedToolChoice)
    named = [t for t in body.tools or [] if isinstance(t, dict)
             and isinstance(t.get("function"), dict) and t["function"].get("name") == choice.function.name]
    if not named:
        raise BadRequest(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
    return named


def forced_prefix(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The tokens the answer is made to start with: `[TOOL_CALLS]` for tool_choice "required",
    `[TOOL_CALLS]name[ARGS]` for a named choice (the model then writes the arguments), none
    otherwise. They go at the end of the prompt, and the answer's parser takes them as its first
    tokens, so the call is in the answer whatever the model would have begun with. The rest is
    grammar-constrained (the grammar takes these tokens first): a tool's name, then arguments that
    follow its schema."""
    choice = body.tool_choice
    if choice == "required" or isinstance(choice, NamedToolChoice):
        if tokenizer.tool_calls_id is None or tokenizer.args_id is None:
            raise BadRequest("this model's tokenizer has no tool-call tokens: tool_choice 'required' or a named "
                             "function cannot be enforced", "tool_choice")
        if choice == "required":
            return [tokenizer.tool_calls_id]
        return [tokenizer.tool_calls_id, *tokenizer.encode_text(choice.function.name, bos=False), tokenizer.args_id]
    return []


def tool_call_json(call: Any, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        out["index"] = index
    return out


class ChatJob(Job):
    CHUNK_OBJECT = "chat.completion.chunk"

    def __init__(self, core: IngressCore, body: ChatCompletionRequest, rid: str, streams: list[EngineStream],
                 prompt: list[int], model: str, forced: list[int] | None = None) -> None:
        super().__init__(rid, streams, model, body.include_usage)
        self.body, self.prompt = body, prompt
        self.tokens = TokenText(core.tokenizer)
        max_calls = None if body.parallel_tool_calls else 1
        self.parsers = [ChatParser(core.tokenizer, max_calls) for _ in streams]
        for parser in self.parsers:
            parser.prime(forced or [])

    def prompt_tokens(self) -> int:
        return len(self.prompt)

    async def collect(self) -> dict[str, Any]:
        try:
            async for i, out in merged(self.streams):  # text deltas
                self.parsers[i].feed(out.token_ids, len(out.text), out.finished)
        finally:
            self.cancel()
        choices = []
        for i, (parser, stream) in enumerate(zip(self.parsers, self.streams, strict=True)):
            out = stream.result()
            message: dict[str, Any] = {"role": "assistant",
                                       "content": parser.content or (None if parser.calls else ""),
                                       "reasoning_content": parser.reasoning or None}
            if parser.calls:
                message["tool_calls"] = [tool_call_json(c) for c in parser.calls]
            choice: dict[str, Any] = {"index": i, "message": message,
                                      "finish_reason": parser.finish_reason(out.finish_reason),
                                      "stop_reason": out.stop_reason,
                                      "logprobs": chat_logprobs(self.tokens, out.logprobs or ())
                                      if self.body.logprobs else None}
            if self.body.return_token_ids:
                choice["prompt_token_ids"], choice["token_ids"] = self.prompt, list(out.token_ids)
            choices.append(choice)
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def _choice_events(self) -> AsyncIterator[str]:
        for i in range(len(self.streams)):
            yield sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]))
        async for i, out in merged(self.streams):  # text deltas
            parser = self.parsers[i]
            delta = parser.feed(out.token_ids, len(out.text), out.finished)
            lps = out.logprobs or ()
            # Token ids whose text the parser holds back (or that make none) still go out with it.
            if delta or lps or (self.body.return_token_ids and out.token_ids):
                choice: dict[str, Any] = {"index": i, "delta": _delta_json(delta), "finish_reason": None,
                                          "logprobs": chat_logprobs(self.tokens, lps) if self.body.logprobs
                                          else None}
                if self.body.return_token_ids:
                    choice["token_ids"] = list(out.token_ids)
                yield sse(self._chunk([choice]))
            if out.finished:
                yield sse(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": parser.finish_reason(out.finish_reason),
                                        "stop_reason": out.stop_reason}]))


def _delta_json(delta: ChatDelta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        calls = []
        for c in delta.tool_calls:
            if c.id is not None:
                calls.append({"index": c.index, "id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}})
            else:
                calls.append({"index": c.index, "function": {"arguments": c.arguments}})
        out["tool_calls"] = calls
    return out


async def encode_messages(core: IngressCore, info: ModelInfo, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None, reasoning_effort: str | None) -> EncodedChat:
    """A chat's prompt as the chat endpoint encodes it (before any forced tool-call prefix)."""
    # Images are fetched, checked and decoded by the ingress (deployments/images.py); mistral-common
    # resizes them by the Pixtral rules while encoding, off the event loop (templating and
    # tokenizing take a while too); the decoded pixels are let go once encoded.
    no_images = None if info.has_vision and core.vision.available else info.name
    async with core.images.decoded(messages, no_images) as (decoded, _):
        return await asyncio.to_thread(core.encode_chat, decoded, tools, reasoning_effort)


async def start_chat(core: IngressCore, body: ChatCompletionRequest) -> ChatJob:
    body.unsupported()
    info = await core.check_model(body.model)
    encoded = await encode_messages(core, info, body.messages, prompt_tools(body), body.reasoning_effort)
    forced = forced_prefix(body, core.tokenizer)
    prompt = list(encoded.token_ids) + forced
    core.check_prompt(prompt, info, "messages")
    core.check_n(body.n, 1)
    max_tokens = core.max_tokens(body.requested_max_tokens, [len(prompt)], info, core.config.max_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = core.sampling_params(body, max_tokens, logprobs)
    if forced and not body.parallel_tool_calls:  # the one call is under way: a second [TOOL_CALLS] ends it
        params = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, forced[0]))
    choice = body.tool_choice
    grammar = await core.grammar(lambda grammars: grammars.for_chat(
        body.response_format, body.tools, choice if isinstance(choice, str) else None,
        choice.function.name if isinstance(choice, NamedToolChoice) else None, body.parallel_tool_calls,
        body.reasoning_effort not in (None, "none"), forced))
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    images = await core.embed_images(prompt, encoded.images)  # the VisionEncoder deployment, batched
    rid, streams = await core.start("chatcmpl", [prompt], params, body.n, images, "messages", body.cache_salt)
    return ChatJob(core, body, rid, streams, prompt, info.name, forced)
