"""`parallel_tool_calls: false`: the chat parser keeps the answer's first tool call and drops a
second call and everything after it."""

from __future__ import annotations

from pathlib import Path

from cluster.model.tokenizer import Tokenizer
from deployments.api.chat_parser import ChatParser


def _two_calls(t: Tokenizer) -> list[int]:
    def call(name: str, args: str) -> list[int]:
        return [t.tool_calls_id, *t.encode_text(name, bos=False), t.args_id, *t.encode_text(args, bos=False)]
    return call("get_weather", '{"city": "Paris"}') + call("get_time", '{"zone": "CET"}')


def test_one_call_kept_when_parallel_calls_are_off(tiny_ckpt: Path) -> None:
    t = Tokenizer.from_model_dir(tiny_ckpt)
    ids = _two_calls(t)
    both = ChatParser(t)
    both.feed(ids, len(t.decode(ids)), finished=True)
    assert [(c.name, c.arguments) for c in both.calls] == [("get_weather", '{"city": "Paris"}'),
                                                           ("get_time", '{"zone": "CET"}')]
    one = ChatParser(t, max_calls=1)
    deltas = [one.feed([tok], len(t.decode(ids[:i + 1])) - len(t.decode(ids[:i]))) for i, tok in enumerate(ids)]
    deltas.append(one.feed([], 0, finished=True))
    assert [(c.name, c.arguments) for c in one.calls] == [("get_weather", '{"city": "Paris"}')]
    assert one.content == "" and one.finish_reason("stop") == "tool_calls"
    streamed = [c for d in deltas for c in d.tool_calls]
    assert {c.index for c in streamed} == {0}
    assert "".join(c.arguments for c in streamed) == '{"city": "Paris"}'
