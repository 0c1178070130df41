"""When a sequence stops, and the text it shows so far.

Text is decoded incrementally (whole UTF-8 characters only). While stop strings may still
match, the last `max(len(stop)) - 1` characters are held back so that streamed text never
shows a stop string's prefix that is later cut.
"""

from __future__ import annotations

from pathlib import Path

from cluster.engine.sequence import Sequence, Status
from cluster.errors import CheckpointError, RequestError
from cluster.model.tokenizer import IncrementalDecoder, Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer | None, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._decoders: dict[str, IncrementalDecoder] = {}

    @classmethod
    def for_model_dir(cls, model_dir: Path, config_eos: tuple[int, ...]) -> StopChecker:
        try:
            tokenizer: Tokenizer | None = Tokenizer.from_model_dir(model_dir)
        except CheckpointError:
            tokenizer = None  # token-id-only use; text prompts and stop strings are refused
        eos = set(config_eos) | ({tokenizer.eos_id} if tokenizer else set())
        return cls(tokenizer, eos)

    def start(self, seq: Sequence) -> None:
        if self.tokenizer is None:
            if seq.params.stop:
                raise RequestError("stop strings need a tokenizer; this model directory has none")
            return
        self._decoders[seq.request_id] = IncrementalDecoder(self.tokenizer)

    def forget(self, seq: Sequence) -> None:
        self._decoders.pop(seq.request_id, None)

    def update(self, seq: Sequence, token: int, max_model_len: int) -> None:
        """Called after `token` was appended to `seq`; marks it finished when it should stop."""
        params = seq.params
        decoder = self._decoders.get(seq.request_id)
        before = len(seq.text)
        if decoder is not None:
            seq.text += decoder.push(token)
        if not params.ignore_eos and token in self.eos_ids:
            self._finish(seq, "stop", None)
        elif token in params.stop_token_ids:
            self._finish(seq, "stop", token)
        elif params.stop and self._match_stop_string(seq, before):
            pass
        elif seq.num_output >= params.max_tokens or len(seq.token_ids) >= max_model_len:
            self._finish(seq, "length", None)

    def _match_stop_string(self, seq: Sequence, before: int) -> bool:
        # A new match must end in the newest text, so it starts at most len(stop) - 1 before it.
        tail_start = max(0, before - max(len(s) for s in seq.params.stop) + 1)
        hits = [(seq.text.find(s, tail_start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        seq.text = seq.text[:at]
        self._finish(seq, "stop", stop)
        return True

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason

    def visible_text(self, seq: Sequence) -> str:
        if seq.finished or not seq.params.stop:
            return seq.text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.text[:len(seq.text) - hold] if hold else seq.text
