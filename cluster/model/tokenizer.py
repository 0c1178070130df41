"""Mistral tekken tokenizer: chat/text encoding, (streaming) decoding and a v15 tekken.json writer."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from mistral_common import exceptions as mc_errors
from mistral_common.protocol.instruct.converters import (
    convert_openai_messages,
    convert_openai_tools,
)
from mistral_common.protocol.instruct.messages import ChatMessage, UserMessage
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers import instruct
from mistral_common.tokens.tokenizers.base import (
    SpecialTokenPolicy,
    SpecialTokens,
    TokenizerVersion,
)
from mistral_common.tokens.tokenizers.mistral import (
    MistralTokenizer,
    load_audio_encoder,
    load_image_encoder,
)
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from cluster.errors import CheckpointError, ClusterError, RequestError

_SHIPPED_TEKKEN = Path(instruct.__file__).parents[2] / "data" / "tekken_240911.json"
_ROLES = ("system", "developer", "user", "assistant", "tool")
_BAD_INPUT: tuple[type[Exception], ...] = (
    ValueError, KeyError, TypeError, AttributeError, AssertionError, RuntimeError, mc_errors.MistralCommonException,
)


class TokenizerError(ClusterError):
    """Base of the tokenizer's errors."""


class TokenizerNotFoundError(TokenizerError, CheckpointError):
    """The model directory has neither tekken.json nor tokenizer.json."""


class TokenizerFormatError(TokenizerError, CheckpointError):
    """A tokenizer file exists but is not a loadable tekken tokenizer."""


class InvalidChatRequestError(TokenizerError, RequestError):
    """A chat request was rejected; `field` names the offending request field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


@dataclass(frozen=True)
class EncodedChat:
    token_ids: list[int]
    images: list[np.ndarray]  # [C, H, W] float32, in prompt order


def write_tekken_v15(path: Path, image_patch_size: int, spatial_merge_size: int, max_image_size: int) -> Path:
    """Write a v15 tekken.json built on the shipped 240911 vocab; `path` may be a file or a directory."""
    image = {
        "image_patch_size": image_patch_size,
        "max_image_size": max_image_size,
        "spatial_merge_size": spatial_merge_size,
    }
    if bad := [k for k, v in image.items() if not isinstance(v, int) or v <= 0]:
        raise ValueError(f"{', '.join(bad)} must be positive ints, got {image}")
    path = Path(path)
    if path.is_dir():
        path = path / "tekken.json"
    data = json.loads(_SHIPPED_TEKKEN.read_text(encoding="utf-8"))
    names = [t.value for t in SpecialTokens]
    num_special = data["config"]["default_num_special_tokens"]
    names += [Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i) for i in range(len(names), num_special)]
    out = {
        "config": {**data["config"], "version": TokenizerVersion.v15.value},
        "vocab": data["vocab"],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)],
        "image": image,
        "model_settings_builder": {
            "reasoning_effort": {"values": ["none", "high"], "accepts_none": True, "default": "none"}
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a concurrent reader never sees a half-written 19 MB file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(json.dumps(out, ensure_ascii=True, separators=(",", ":")).encode("ascii"))
    os.replace(tmp, path)
    return path


def _load_tokenizer_json(path: Path) -> MistralTokenizer:
    # MistralTokenizer.from_file only accepts files whose *name* contains "tekken", so a tekken-format
    # tokenizer.json is assembled here the way from_file does it.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerFormatError(f"{path}: unreadable tokenizer file: {e}") from e
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or "version" not in config or not isinstance(data.get("vocab"), list):
        raise TokenizerFormatError(f"{path}: not a tekken tokenizer (HF tokenizers format is unsupported)")
    try:
        tekken = Tekkenizer.from_file(path)
        cls = getattr(instruct, f"InstructTokenizer{tekken.version.value.upper()}")
        kwargs: dict[str, Any] = {"image_encoder": tekken.image and load_image_encoder(tekken.image, tekken)}
        if tekken.version >= TokenizerVersion.v7:
            kwargs["audio_encoder"] = tekken.audio and load_audio_encoder(tekken.audio, tekken)
        return MistralTokenizer(
            cls(tekken, **kwargs),
            validator=get_validator(tekken.version, mode=ValidationMode.test),
            request_normalizer=get_normalizer(tekken.version, tekken.model_settings_builder),
        )
    except _BAD_INPUT as e:
        raise TokenizerFormatError(f"{path}: invalid tekken tokenizer: {e}") from e


@contextmanager
def _rejected_as(field: str) -> Iterator[None]:
    """Re-raise mistral-common/pydantic rejections as InvalidChatRequestError naming the field."""
    try:
        yield
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        raise InvalidChatRequestError(".".join(p for p in (field, loc) if p) or "request", err["msg"]) from e
    except _BAD_INPUT as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise InvalidChatRequestError(field or _field_of(e), detail) from e


def _field_of(e: Exception) -> str:
    if isinstance(e, (mc_errors.InvalidToolSchemaException, mc_errors.InvalidToolException)):
        return "tools"
    if isinstance(e, mc_errors.InvalidRequestException):
        return next(
            (f for f in ("reasoning_effort", "response_format", "json_schema") if f in str(e)), "request"
        )
    return "messages"


class _SpecialId:
    """Read-only attribute resolving a special token's id, or None where the tokenizer lacks it."""

    def __init__(self, token: SpecialTokens) -> None:
        self._name = token.value

    def __get__(self, obj: Tokenizer | None, owner: type | None = None) -> int | None:
        if obj is None or not obj._tekken.is_special(self._name):
            return None
        return obj._tekken.get_special_token(self._name)


class Tokenizer:
    """Tekken tokenizer of one model directory; pickles as a reload from that directory."""

    think_id = _SpecialId(SpecialTokens.begin_think)
    end_think_id = _SpecialId(SpecialTokens.end_think)
    tool_calls_id = _SpecialId(SpecialTokens.tool_calls)
    args_id = _SpecialId(SpecialTokens.args)
    img_id = _SpecialId(SpecialTokens.img)
    img_break_id = _SpecialId(SpecialTokens.img_break)
    img_end_id = _SpecialId(SpecialTokens.img_end)

    def __init__(self, mistral: MistralTokenizer, model_dir: Path) -> None:
        tekken = mistral.instruct_tokenizer.tokenizer
        if not isinstance(tekken, Tekkenizer):
            raise TokenizerFormatError(f"{model_dir}: a {type(tekken).__name__}, not a tekken tokenizer")
        self._mistral = mistral
        self._tekken = tekken
        self.model_dir = model_dir

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Tokenizer:
        model_dir = Path(model_dir)
        tekken_json, tokenizer_json = model_dir / "tekken.json", model_dir / "tokenizer.json"
        if tekken_json.is_file():
            try:
                return cls(MistralTokenizer.from_file(tekken_json), model_dir)
            except _BAD_INPUT as e:
                raise TokenizerFormatError(f"{tekken_json}: invalid tekken tokenizer: {e}") from e
        if tokenizer_json.is_file():
            return cls(_load_tokenizer_json(tokenizer_json), model_dir)
        raise TokenizerNotFoundError(f"no tekken.json or tokenizer.json in {model_dir}")

    def __reduce__(self) -> tuple[Any, ...]:
        return Tokenizer.from_model_dir, (self.model_dir,)

    @property
    def mistral(self) -> MistralTokenizer:
        """mistral-common's tokenizer (what its grammar factory is built from)."""
        return self._mistral

    @property
    def vocab_size(self) -> int:
        return self._tekken.n_words

    @property
    def bos_id(self) -> int:
        return self._tekken.bos_id

    @property
    def eos_id(self) -> int:
        return self._tekken.eos_id

    @property
    def pad_id(self) -> int:
        return self._tekken.pad_id

    def special_id(self, name: str) -> int:
        """Id of special token `name` (e.g. "[THINK]"); KeyError if the tokenizer lacks it."""
        if not self._tekken.is_special(name):
            raise KeyError(f"tokenizer has no special token {name!r}")
        return self._tekken.get_special_token(name)

    def is_special(self, token_id: int) -> bool:
        return self._tekken.is_special(int(token_id))

    def encode_text(self, text: str, bos: bool = True) -> list[int]:
        """Raw completion prompt; special-token strings inside `text` are encoded as plain text."""
        return self._tekken.encode(text, bos=bos, eos=False)

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, reasoning_effort: str | None = None
    ) -> EncodedChat:
        if not isinstance(messages, list) or not messages:
            raise InvalidChatRequestError("messages", "must be a non-empty list")
        if tools is not None and not isinstance(tools, list):
            raise InvalidChatRequestError("tools", "must be a list")
        converted = [_convert_message(i, m) for i, m in enumerate(messages)]
        converted_tools = None if tools is None else [_convert_tool(i, t) for i, t in enumerate(tools)]
        with _rejected_as(""):  # "": the field is inferred from the error
            request: ChatCompletionRequest[ChatMessage] = ChatCompletionRequest.model_validate(
                {"messages": converted, "tools": converted_tools, "reasoning_effort": reasoning_effort}
            )
            tokenized = self._mistral.encode_chat_completion(request)
        return EncodedChat(token_ids=list(tokenized.tokens), images=list(tokenized.images))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
        return self._tekken.decode(list(ids), special_token_policy=policy)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; b"" for special tokens."""
        return self._tekken.id_to_byte_piece(int(token_id), SpecialTokenPolicy.IGNORE)


def _convert_message(i: int, msg: Any) -> Any:
    field = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise InvalidChatRequestError(field, "must be an object")
    if msg.get("role") not in _ROLES:
        raise InvalidChatRequestError(f"{field}.role", f"must be one of {_ROLES}, got {msg.get('role')!r}")
    content = msg.get("content")
    parts: list[Any] = content if isinstance(content, list) else []
    for j, part in enumerate(parts):
        url = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
        url = url.get("url") if isinstance(url, dict) else url
        # mistral-common would open file:// URLs and download http(s) ones from inside the tokenizer:
        # a local-file read / SSRF hole, so remote images must be fetched by the caller first.
        if url is not None and not (isinstance(url, str) and url.startswith("data:")):
            raise InvalidChatRequestError(f"{field}.content[{j}].image_url", "only data: URLs are accepted")
    with _rejected_as(field):
        # The OpenAI converter only knows image_url parts; {"type": "image"} needs pydantic's own union.
        if any(isinstance(p, dict) and p.get("type") == "image" for p in parts):
            if msg["role"] != "user":
                raise ValueError("image parts are only allowed in user messages")
            return UserMessage.model_validate(msg)
        return convert_openai_messages([msg])[0]


def _convert_tool(i: int, tool: Any) -> Any:
    with _rejected_as(f"tools[{i}]"):
        return convert_openai_tools([tool])[0]


class IncrementalDecoder:
    """Streaming decode: emits only completed UTF-8 text, so a character split over tokens comes out whole."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Emit what is left at end of stream (an incomplete trailing sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
