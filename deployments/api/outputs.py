"""What clients are sent, made from the engine streams' text deltas: usage, token strings and
logprobs in the OpenAI shapes, server-sent events."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from cluster.engine.sequence import TokenLogprobs
from cluster.model.tokenizer import Tokenizer


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The OpenAI usage object, with `prompt_tokens_details.cached_tokens` (prompt tokens the
    prefix cache gave) as OpenAI and vLLM report it (the gRPC `Usage` message has the same fields)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Display strings of single tokens (special tokens by name), cached per tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)

    def _text(self, token_id: int) -> str:
        if self._tokenizer.is_special(token_id):
            return self._tokenizer.decode([token_id], skip_special=False)
        return self._tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def bytes(self, token_id: int) -> list[int]:
        if self._tokenizer.is_special(token_id):
            return list(self.text(token_id).encode())
        return list(self._tokenizer.token_bytes(token_id))


def completion_logprobs(tokens: TokenText, lps: tuple[TokenLogprobs, ...], offset: int) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        s = tokens.text(lp.token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({tokens.text(t): v for t, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def chat_logprobs(tokens: TokenText, lps: tuple[TokenLogprobs, ...]) -> dict[str, Any]:
    return {"content": [
        {"token": tokens.text(lp.token_id), "logprob": lp.logprob, "bytes": tokens.bytes(lp.token_id),
         "top_logprobs": [{"token": tokens.text(t), "logprob": v, "bytes": tokens.bytes(t)} for t, v in lp.top]}
        for lp in lps]}


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
