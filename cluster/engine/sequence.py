"""A request's mutable state inside the engine, and the immutable outputs it reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

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

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
