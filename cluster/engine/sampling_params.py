"""Per-request sampling settings, validated where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20


def _int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidSamplingParamsError(f"{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """As in vLLM: temperature 0 is greedy; top_k 0 (or -1) and top_p 1 disable those filters."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1  # choices of the same prompt; they share the prompt's KV blocks

    def __post_init__(self) -> None:
        _int("max_tokens", self.max_tokens, 1)
        _int("n", self.n, 1)
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidSamplingParamsError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("top_k", self.top_k, -1)
        if self.seed is not None:
            _int("seed", self.seed, 0, 2**63 - 1)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidSamplingParamsError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        for i in ids:
            _int("stop_token_ids[]", i, 0)
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
