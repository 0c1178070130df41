"""Where an engine stream is consumed: its token deltas made into the outputs a caller asked for.

The engine emits only what is new in a step (`EngineOutput`: token ids, logprobs, the prompt ids
once). An `OutputAggregator` per request makes the text (once), finds stop strings, and gives
`RequestOutput`s of one `OutputKind`: everything so far after each step, only what is new, or one
output at the end. `LLM`, `AsyncEngine.generate`, the expert group's engines and the serving
ingress all use it; none of them accumulates by itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.engine.detokenizer import Detokenizer
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import EngineOutput, TokenLogprobs

if TYPE_CHECKING:
    from cluster.model.tokenizer import Tokenizer


class OutputKind(enum.Enum):
    """As vLLM's `RequestOutputKind`."""

    CUMULATIVE = "cumulative"  # everything so far, after every step that advanced the request
    DELTA = "delta"  # what is new since the previous output (the prompt ids on the first only)
    FINAL_ONLY = "final_only"  # one output, everything, when the request finishes


@dataclass(frozen=True)
class RequestOutput:
    """One request's output as its consumer sees it. `token_ids`, `text` and `logprobs` are all so
    far (CUMULATIVE, FINAL_ONLY) or what is new since the previous output (DELTA, where
    `prompt_token_ids` is None after the first output). `stop_reason` is the stop string or the
    stop token id that ended the request (None for EOS, the length limits and aborts)."""

    request_id: str
    prompt_token_ids: tuple[int, ...] | None
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: str | int | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    index: int = 0  # which of the request's choices
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache gave (known from the first output)


class OutputAggregator:
    """One choice's stream (choice `index` of the request): feed it every `EngineOutput` of that
    choice, in order, with `add`."""

    def __init__(self, request_id: str, params: SamplingParams, tokenizer: Tokenizer | None,
                 kind: OutputKind = OutputKind.CUMULATIVE, index: int = 0) -> None:
        self.request_id, self.kind, self.index = request_id, kind, index
        self._text = Detokenizer(tokenizer, params.stop, params.include_stop_str_in_output)
        self._min_tokens = params.min_tokens  # stop strings do not stop the first min_tokens tokens
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self._prompt: tuple[int, ...] | None = None
        self._num_cached: int | None = None
        self._prompt_sent = False
        self.finished = False
        self.must_abort = False  # finished here by a stop string while the engine still runs it
        self._finish_reason: str | None = None
        self._stop_reason: str | int | None = None

    @property
    def prompt_token_ids(self) -> tuple[int, ...] | None:
        return self._prompt

    @property
    def num_tokens(self) -> int:
        """Output tokens so far."""
        return len(self._token_ids)

    @property
    def num_chars(self) -> int:
        """Characters of text released so far."""
        return self._text.num_released

    def add(self, out: EngineOutput) -> RequestOutput | None:
        """The output for this step in the aggregator's kind (None for FINAL_ONLY before the end, and
        for anything after the request finished). When it is finished and `must_abort` is set, a
        stop string ended it: the caller aborts the request in the engine, which frees its blocks."""
        if self.finished:
            return None
        if out.prompt_token_ids is not None:
            self._prompt = out.prompt_token_ids
        if out.num_cached_tokens is not None:
            self._num_cached = out.num_cached_tokens
        ids = out.new_token_ids
        # The engine's own stop (EOS, a stop token id) on the last token comes before stop strings.
        engine_stop = out.finished and out.finish_reason == "stop"
        keep, by_string = len(ids), False
        for i, tok in enumerate(ids):
            held = len(self._token_ids) + i + 1 <= self._min_tokens
            if self._text.push(tok, check_stop=not (held or (engine_stop and i == len(ids) - 1))):
                keep, by_string = i + 1, True
                break
        if out.finished and not by_string:
            past_min = len(self._token_ids) + len(ids) > self._min_tokens
            by_string = self._text.finish(check_stop=not engine_stop and past_min)
        if by_string:
            self._finish_reason, self._stop_reason = "stop", self._text.stop_string
            self.must_abort = not out.finished
        elif out.finished:
            self._finish_reason, self._stop_reason = out.finish_reason, out.stop_reason
        self.finished = out.finished or by_string
        if self.finished:
            self._text.finish(check_stop=False)
        new_ids = tuple(ids[:keep])
        new_lps = tuple(out.new_logprobs[:keep]) if self._logprobs is not None and out.new_logprobs else ()
        self._token_ids.extend(new_ids)
        if self._logprobs is not None:
            self._logprobs.extend(new_lps)
        new_text = self._text.release()
        if self.kind is OutputKind.DELTA:
            prompt, self._prompt_sent = (None if self._prompt_sent else self._prompt), True
            return self._output(prompt, new_ids, new_text, new_lps if self._logprobs is not None else None)
        if self.kind is OutputKind.FINAL_ONLY and not self.finished:
            return None
        return self.cumulative()

    def cumulative(self) -> RequestOutput:
        """Everything so far, whatever the kind (the whole answer once finished)."""
        return self._output(self._prompt, tuple(self._token_ids), self._text.text[:self._text.num_released],
                            tuple(self._logprobs) if self._logprobs is not None else None)

    def _output(self, prompt: tuple[int, ...] | None, ids: tuple[int, ...], text: str,
                logprobs: tuple[TokenLogprobs, ...] | None) -> RequestOutput:
        return RequestOutput(self.request_id, prompt, ids, text, self.finished,
                             self._finish_reason if self.finished else None,
                             self._stop_reason if self.finished else None, logprobs, self.index, self._num_cached)
