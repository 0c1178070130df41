"""Splits a chat answer's tokens into reasoning (`[THINK]...[/THINK]`), content and tool calls
(`[TOOL_CALLS]name[ARGS]{json}`), incrementally, for streamed and whole answers alike.

The stream's text (`cluster.engine.output_aggregator`) is the decoded answer with special tokens
dropped, with stop strings cut and their possible prefixes held back while streaming. The parser
decodes the same tokens the same way (its decoder's tail flushed at the end too), so its characters
line up with that text one to one; it releases no more characters than that text has released,
which keeps stop strings and held-back prefixes out of every channel.
"""

from __future__ import annotations

import codecs
import secrets
import string
from dataclasses import dataclass, field

from cluster.model.tokenizer import Tokenizer

_ID_ALPHABET = string.ascii_letters + string.digits
REASONING, CONTENT, TOOL_NAME, TOOL_ARGS, CALL_START = "reasoning", "content", "name", "args", "start"
DROPPED = "dropped"  # past the last call allowed (parallel_tool_calls false): nothing more is kept


def tool_call_id() -> str:
    # mistral-common accepts back only 9-character alphanumeric tool call ids.
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None  # set (with the name) on a call's first delta
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ToolCall:
    index: int
    id: str
    name: str = ""
    arguments: str = ""
    started: bool = False


@dataclass
class _Piece:
    kind: str
    call: int
    text: str = ""


@dataclass
class ChatParser:
    tokenizer: Tokenizer
    max_calls: int | None = None  # 1 for parallel_tool_calls false: a later call and all after it dropped
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    _mode: str = CONTENT
    _allowed: int = 0  # characters the stream's text has released
    _released: int = 0  # characters released here
    _pending: list[_Piece] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.tokenizer
        self._switch = {t.think_id: REASONING, t.end_think_id: CONTENT}
        self._switch.pop(None, None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: tuple[int, ...] | list[int], new_chars: int, finished: bool = False) -> ChatDelta:
        """`token_ids`: the answer's new tokens; `new_chars`: the length of the text delta that came
        with them. The finishing call's delta also has the decoder's tail and the names of calls
        cut before their [ARGS]."""
        for tok in token_ids:
            self._token(int(tok))
        self._allowed += new_chars
        if not finished:
            return self._release()
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._pending.append(_Piece(self._mode, len(self.calls) - 1, tail))
        delta = self._release()
        late = tuple(ToolCallDelta(c.index, c.id, c.name.strip(), "") for c in self.calls if not c.started)
        for c in self.calls:
            c.started, c.name = True, c.name.strip()
        return ChatDelta(delta.reasoning, delta.content, delta.tool_calls + late) if late else delta

    def prime(self, token_ids: list[int]) -> None:
        """Tokens the answer was made to start with (a forced tool call: `[TOOL_CALLS]name[ARGS]`),
        parsed as if generated. The engine's text does not hold them, so the call's name is taken
        at once rather than released against that text; the call starts with the first delta."""
        for tok in token_ids:
            self._token(int(tok))
        kept = []
        for piece in self._pending:
            if piece.kind == TOOL_NAME:
                self.calls[piece.call].name += piece.text
            elif piece.kind == CALL_START:
                kept.append(piece)
            else:
                raise ValueError(f"a forced prefix carries only a tool call's start, not {piece.kind} text")
        self._pending = kept

    def _token(self, tok: int) -> None:
        t = self.tokenizer
        if self._mode == DROPPED:
            return
        if tok in self._switch:
            self._mode = self._switch[tok]
        elif tok == t.tool_calls_id and self.max_calls is not None and len(self.calls) >= self.max_calls:
            self._mode = DROPPED
        elif tok == t.tool_calls_id:
            self.calls.append(ToolCall(len(self.calls), tool_call_id()))
            self._mode = TOOL_NAME
        elif tok == t.args_id and self._mode == TOOL_NAME:
            self._pending.append(_Piece(CALL_START, len(self.calls) - 1))
            self._mode = TOOL_ARGS
        elif not t.is_special(tok):
            text = self._utf8.decode(t.token_bytes(tok))
            if text:
                self._pending.append(_Piece(self._mode, len(self.calls) - 1, text))

    def _release(self) -> ChatDelta:
        budget = self._allowed - self._released
        reasoning, content, calls = [], [], []
        while self._pending:
            piece = self._pending[0]
            if piece.kind == CALL_START:
                call = self.calls[piece.call]
                call.started, call.name = True, call.name.strip()
                calls.append(ToolCallDelta(call.index, call.id, call.name, ""))
                self._pending.pop(0)
                continue
            if budget <= 0:
                break
            text = piece.text[:budget]
            budget -= len(text)
            self._released += len(text)
            if len(text) == len(piece.text):
                self._pending.pop(0)
            else:
                piece.text = piece.text[len(text):]
            if piece.kind == REASONING:
                reasoning.append(text)
            elif piece.kind == CONTENT:
                content.append(text)
            elif piece.kind == TOOL_NAME:
                self.calls[piece.call].name += text
            else:
                self.calls[piece.call].arguments += text
                _add_arguments(calls, piece.call, text)
        delta = ChatDelta("".join(reasoning), "".join(content), tuple(calls))
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason


def _add_arguments(calls: list[ToolCallDelta], index: int, text: str) -> None:
    if calls and calls[-1].index == index:
        last = calls[-1]
        calls[-1] = ToolCallDelta(index, last.id, last.name, last.arguments + text)
    else:
        calls.append(ToolCallDelta(index, arguments=text))
