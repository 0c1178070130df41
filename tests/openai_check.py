"""Every OpenAI-API answer a test receives is checked against the `openai` package's own types:
`ChatCompletion` and `ChatCompletionChunk` for /v1/chat/completions, `Completion` for
/v1/completions (and per chunk `CompletionChunk`: `Completion` with a choice's `finish_reason`
null until its last chunk, as the API streams it). The check is pydantic's strict mode: every
required field there, every value of its declared type without coercion; fields the types do not
declare (`token_ids`, `reasoning_content`) are allowed.

- raw HTTP: `body(response)`, `chunks(response)` / `achunks(response)`, or `chunk(line, model)`
  for a loop that leaves a stream early;
- the official client: `client(...)` checks every body and chunk it parses, before parsing it
  (its default builds the objects without checking them).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import httpx2 as httpx
import openai
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel


class CompletionStreamChoice(CompletionChoice):
    finish_reason: Literal["stop", "length", "content_filter"] | None  # required, null until the last chunk


class CompletionChunk(Completion):
    """A streamed /v1/completions chunk (the openai package parses it as a `Completion`)."""

    choices: list[CompletionStreamChoice]


DONE = "data: [DONE]"


def check(data: Any, model: type[BaseModel]) -> dict[str, Any]:
    """`data` (a decoded body or chunk), once it validates strictly as `model`."""
    model.model_validate(data, strict=True)
    return data


def models(response: httpx.Response) -> tuple[type[BaseModel], type[BaseModel]]:
    """(body type, chunk type) of the endpoint `response` answers."""
    path = response.request.url.path
    if path.endswith("/chat/completions"):
        return ChatCompletion, ChatCompletionChunk
    if path.endswith("/completions"):
        return Completion, CompletionChunk
    raise AssertionError(f"{path} is not an OpenAI completions endpoint")


def body(response: httpx.Response) -> dict[str, Any]:
    """The checked body of a successful (200) whole answer."""
    assert response.status_code == 200, response.text
    return check(response.json(), models(response)[0])


def chunk(line: str, model: type[BaseModel]) -> dict[str, Any] | None:
    """The checked chunk a server-sent-events line carries; None for any other line (blank, the
    `[DONE]` marker)."""
    if not line.startswith("data: ") or line == DONE:
        return None
    return check(json.loads(line[len("data: "):]), model)


def chunks(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Every chunk of a successful streamed answer, checked, in order; read to the end, the stream
    must end with `data: [DONE]`."""
    assert response.status_code == 200, response.read()
    model, done = models(response)[1], False
    for line in response.iter_lines():
        assert not done or not line, f"after {DONE}: {line!r}"
        done = done or line == DONE
        data = chunk(line, model)
        if data is not None:
            yield data
    assert done, f"the stream ended without {DONE}"


async def achunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """`chunks` of an async client's response."""
    assert response.status_code == 200, await response.aread()
    model, done = models(response)[1], False
    async for line in response.aiter_lines():
        assert not done or not line, f"after {DONE}: {line!r}"
        done = done or line == DONE
        data = chunk(line, model)
        if data is not None:
            yield data
    assert done, f"the stream ended without {DONE}"


class CheckedOpenAI(openai.OpenAI):
    """The official client; every body and stream chunk of the completions endpoints it parses goes
    through `check` first (its one funnel for both; tests/unit/test_openai_check.py makes sure it
    still is)."""

    def _process_response_data(self, *, data: object, cast_to: Any, response: httpx.Response) -> Any:
        if cast_to in (Completion, ChatCompletion, ChatCompletionChunk):
            streamed = response.headers.get("content-type", "").startswith("text/event-stream")
            check(data, models(response)[1 if streamed else 0])
        return super()._process_response_data(data=data, cast_to=cast_to, response=response)


def client(base_url: str, api_key: str, timeout: float = 60, http_client: httpx.Client | None = None) -> openai.OpenAI:
    """The official client, checking every body and stream chunk it receives."""
    return CheckedOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout, http_client=http_client)
