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
class RequestOutput:
    """Cumulative state of one request after a step; `new_token_ids` is this step's delta."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: str | int | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None


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
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_preemptions: int = 0
    reported: int = 0  # output tokens already reported

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
