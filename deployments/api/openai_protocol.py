"""OpenAI-compatible request bodies (pydantic, at the HTTP edge only), parsed strictly: wrong types
and out-of-range values are 400s naming the field; unknown fields are ignored, as OpenAI-compatible
servers do."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY
from deployments.errors import BadRequest

NonNegInt = Annotated[int, Field(ge=0)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # a JSON object's key: a token id as a string


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's penalties (over output tokens) and bias ({token id: bias}); vLLM's repetition
    # penalty (over prompt and output), min_p, min_tokens and include_stop_str_in_output
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[TokenIdKey, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    user: str | None = None
    # as vLLM: requests share prefix-cached KV blocks only with requests of the same salt (tenants)
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)

    def unsupported(self) -> None:
        """Refuses what the engine cannot honour rather than ignoring it silently."""
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed with stream: true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    return_token_ids: bool = False
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}: checked, and made a
    # grammar, by cluster.engine.response_grammar (400s name the part)
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise BadRequest("echo is not supported", "echo")
        if self.best_of not in (None, 1, self.n):
            raise BadRequest("best_of is not supported (use n)", "best_of")
        if self.suffix:
            raise BadRequest("suffix is not supported", "suffix")


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "high"] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None  # as CompletionRequest's
    return_token_ids: bool = False

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Strict JSON parse into `model`; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate_json(raw or b"", strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> BadRequest:
    errors = exc.errors(include_url=False)
    first = min(errors, key=lambda e: (e["type"] != "json_invalid", len(e["loc"])))
    if first["type"] == "json_invalid":
        return BadRequest(f"request body is not valid JSON: {first['msg']}", "body")
    # Unions report one error per member: name the field, and say what each member wanted.
    loc = _clean(first["loc"])
    param = ".".join(loc) or "body"
    if first["type"] == "missing":
        return BadRequest(f"{param} is required", param)
    same = [e for e in errors if _clean(e["loc"])[:1] == loc[:1]]
    details = list(dict.fromkeys(f"{'.'.join(_clean(e['loc'])) or 'body'}: {e['msg']}" for e in same))
    return BadRequest("; ".join(details[:4]), param)


def _clean(loc: tuple) -> list[str]:
    return [str(p) for p in loc if not _is_union_tag(p)]


def _is_union_tag(part: object) -> bool:
    """Pydantic tags union members in the location (`str`, `list[int]`, `function-after[...]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part[:1].isupper())
