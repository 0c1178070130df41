"""A request's mutable state inside the engine, and the immutable outputs it reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from cluster.engine.grammar import GrammarMatcher
from cluster.engine.sampling_params import SamplingParams
from cluster.model.image_rows import ImageRows


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


@dataclass(frozen=True)
class EngineOutput:
    """What one step (or an abort) made of one request: only what is new since its last output.
    Text is not made here: the consumer of the stream decodes the tokens and checks stop strings
    (`cluster.engine.output_aggregator`). The engine finishes a request on EOS, a stop token id,
    `max_tokens` and the context limit; a consumer that finds a stop string aborts it."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    new_logprobs: tuple[TokenLogprobs, ...] | None = None  # one per new token, when logprobs were asked for
    prompt_token_ids: tuple[int, ...] | None = None  # on the request's first output only
    index: int = 0  # which of the request's `n` choices (each choice has its own stream of outputs)
    num_cached_tokens: int | None = None  # on the first output: prompt tokens the prefix cache gave


class TokenCounts:
    """What the penalties of one sequence read, kept as it grows (never rebuilt from all its tokens):
    how often each token is in its output, and whether each is in its prompt or output."""

    def __init__(self, token_ids: list[int], num_prompt_tokens: int, vocab: int) -> None:
        ids = torch.tensor(token_ids, dtype=torch.long)  # [L]
        self.output = torch.bincount(ids[num_prompt_tokens:], minlength=vocab).to(torch.int32)  # [V]
        self.seen = torch.zeros(vocab, dtype=torch.bool)  # [V]
        self.seen[ids] = True

    def add(self, token: int) -> None:
        self.output[token] += 1
        self.seen[token] = True


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int
    images: ImageRows | None = None
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of the tokens not reported yet
    num_preemptions: int = 0
    reported: int = 0  # output tokens already reported
    prompt_reported: bool = False
    index: int = 0  # choice index among the request's `n`
    seq_id: int = 0  # unique in the engine: the key of the sequence's block table
    # The request's other choices, forked from this sequence once its prompt is prefilled: they
    # share its full prompt blocks and sample their first token from the same logits.
    forks: list[Sequence] = field(default_factory=list)
    counts: TokenCounts | None = None  # made at its first sampling when its params have penalties
    grammar: GrammarMatcher | None = None  # where it is in its request's grammar; None without one or once finished
    cache_salt: str | None = None  # isolates the prefix cache's blocks of one tenant from another's
    # content keys of the sequence's full blocks so far (`cluster.engine.prefix_hash`)
    block_keys: list[bytes] = field(default_factory=list)
    num_cached_tokens: int | None = None  # prompt tokens taken from the prefix cache when first admitted

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
