"""When the engine stops a sequence: EOS, a stop token id, `max_tokens`, the context limit.

Stop strings are not checked here: text is made where the stream is consumed, and that is where
they are found (`cluster.engine.detokenizer`); the consumer then aborts the request in the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cluster.engine.sequence import Sequence, Status
from cluster.errors import CheckpointError, RequestError

if TYPE_CHECKING:  # mistral-common: imported only where a model directory has a tokenizer
    from cluster.model.tokenizer import Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer | None, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    @classmethod
    def for_model_dir(cls, model_dir: Path, config_eos: tuple[int, ...]) -> StopChecker:
        tokenizer: Tokenizer | None = None  # token-id-only use; text prompts and stop strings are refused
        try:
            from cluster.model.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_model_dir(model_dir)
        except (CheckpointError, ImportError):  # no tokenizer files, or no mistral-common (token ids only)
            tokenizer = None
        eos = set(config_eos) | ({tokenizer.eos_id} if tokenizer else set())
        return cls(tokenizer, eos)

    def start(self, seq: Sequence) -> None:
        if self.tokenizer is None and seq.params.stop:
            raise RequestError("stop strings need a tokenizer; this model directory has none")

    def update(self, seq: Sequence, token: int, max_model_len: int) -> None:
        """Called after `token` was appended to `seq`; marks it finished when it should stop. EOS
        and the stop token ids do not stop the first `min_tokens` output tokens (the sampler holds
        them back there)."""
        params = seq.params
        held = seq.num_output <= params.min_tokens
        if not params.ignore_eos and token in self.eos_ids and not held:
            _finish(seq, "stop", None)
        elif token in params.stop_token_ids and not held:
            _finish(seq, "stop", token)
        elif seq.num_output >= params.max_tokens or len(seq.token_ids) >= max_model_len:
            _finish(seq, "length", None)


def _finish(seq: Sequence, reason: str, stop_token: int | None) -> None:
    seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_token
