"""Per-request sampling settings, validated where they are made."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.engine.grammar import Grammar
from cluster.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: a bias is in [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]


def _int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidSamplingParamsError(f"{name} must be an integer {bound}, got {value!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidSamplingParamsError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed`: the seed itself for choice 0 (so
    `n = 1` is unchanged), for the others a seed derived from it and their index."""
    if not index:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


@dataclass(frozen=True)
class SamplingParams:
    """As in vLLM: temperature 0 is greedy; top_k 0 (or -1), top_p 1 and min_p 0 disable those
    filters. Logits are changed in this order: `logit_bias`, the penalties, then `temperature`,
    then `top_k`, `top_p` and `min_p`. `repetition_penalty` (> 1 discourages) divides the positive
    logits and multiplies the negative ones of every token in the prompt or the output (vLLM's and
    transformers' rule); `presence_penalty` and `frequency_penalty` (OpenAI's) subtract from the
    logits of tokens in the output only, once and per occurrence. `logit_bias` ({token id: bias} or
    its items, each bias in [-100, 100]) adds to those logits. For the first `min_tokens` output
    tokens, EOS and the stop token ids cannot be sampled and stop strings do not stop.
    `include_stop_str_in_output` keeps the stop string that ended the text."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) sorted by id; a dict is accepted
    logprobs: int | None = None
    n: int = 1  # choices of the same prompt; they share the prompt's KV blocks
    grammar: Grammar | None = None  # what the answer must match (structured output: cluster.engine.grammar)

    def __post_init__(self) -> None:
        _int("max_tokens", self.max_tokens, 1)
        _int("n", self.n, 1)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _number(name, getattr(self, name))
        if self.temperature < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidSamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if abs(getattr(self, name)) > MAX_PENALTY:
                raise InvalidSamplingParamsError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], "
                                                 f"got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise InvalidSamplingParamsError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _int("top_k", self.top_k, -1)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens)
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
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise InvalidSamplingParamsError(f"grammar must be a Grammar, got {type(self.grammar).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (the sampler counts this request's tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    def for_choice(self, index: int) -> SamplingParams:
        """Choice `index` as a request of its own (n = 1), seeded as the engine seeds that choice."""
        seed = None if self.seed is None else choice_seed(self.seed, index)
        return dataclasses.replace(self, n=1, seed=seed)


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    if isinstance(value, Mapping):
        items: list[object] = list(value.items())
    elif isinstance(value, tuple | list):
        items = list(value)
    else:
        raise InvalidSamplingParamsError(f"logit_bias must map token ids to biases, got {value!r}")
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidSamplingParamsError(f"logit_bias must map token ids to biases, got {value!r}")
        token, bias = item
        _int("logit_bias token id", token, 0)
        bias = _number(f"logit_bias[{token}]", bias)
        if abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidSamplingParamsError(f"logit_bias[{token}] must be in [-100, 100], got {bias}")
        out[token] = bias
    return tuple(sorted(out.items()))
