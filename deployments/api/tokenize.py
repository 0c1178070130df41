"""`/tokenize` and `/detokenize`, with vLLM's request and response shapes: a completion prompt or
chat messages as the token ids the generation endpoints would run, and token ids back to text."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.api.openai_chat import encode_messages
from deployments.api.openai_protocol import NonNegInt
from deployments.api.outputs import TokenText
from deployments.errors import BadRequest
from deployments.frontend.ingress_core import IngressCore


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TokenizeRequest(_Body):
    """vLLM's two tokenize bodies in one: `prompt` (a completion prompt, BOS first unless
    `add_special_tokens` is false) or `messages` (a chat, encoded as `/v1/chat/completions`
    encodes it, with `tools` and `reasoning_effort`). mistral-common's chat encoding always ends
    ready for the assistant's answer, so `add_generation_prompt` false changes nothing, as in vLLM
    for Mistral tokenizers; `continue_final_message` is refused."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: Literal["none", "high"] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[NonNegInt]


async def tokenize(core: IngressCore, body: TokenizeRequest) -> dict[str, Any]:
    info = await core.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequest("give either prompt (a completion prompt) or messages (a chat), not both or neither",
                         "prompt" if body.prompt is None else "messages")
    if body.messages is not None:
        if body.continue_final_message:
            raise BadRequest("continue_final_message is not supported", "continue_final_message")
        encoded = await encode_messages(core, info, body.messages, body.tools, body.reasoning_effort)
        tokens = list(encoded.token_ids)
    else:
        assert body.prompt is not None  # one of the two, checked above
        tokens = core.tokenizer.encode_text(body.prompt, bos=body.add_special_tokens)
    out: dict[str, Any] = {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        text = TokenText(core.tokenizer)
        out["token_strs"] = [text.text(t) for t in tokens]
    return out


async def detokenize(core: IngressCore, body: DetokenizeRequest) -> dict[str, str]:
    info = await core.check_model(body.model)
    for i, tok in enumerate(body.tokens):
        if tok >= info.vocab_size:
            raise BadRequest(f"tokens[{i}] is {tok}, outside the vocabulary [0, {info.vocab_size})", "tokens")
    return {"prompt": core.tokenizer.decode(body.tokens)}
