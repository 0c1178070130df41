"""How many prefill tokens a step may take so that its time stays near `target_step_ms`.

The engine feeds every step's measured time, with what the step carried (`StepShape`). The next
step's prefill is sized from the last one by the secant rule: the step time changes by about
`ms_per_token` per token added or removed, so

    prefill = last prefill + (target - last step's ms - ms_per_token * (decodes - last decodes)) / ms_per_token

`ms_per_token` is a running average of a step's time over its tokens (decodes and prefill). It
counts the step's fixed cost in, so it overstates what one more token costs: each step closes
part of the gap to the target and none overshoots it, whatever the machine's speed or load. As a
prompt's context grows its chunks cost more, the steps show it, and the chunks shrink.

Two guards: a step's prefill is at most twice the largest measured (an untried size is approached
by doubling); and every step still carries at least `min_tokens` of prefill, and the prefills
together at least a quarter of the target's time, so a long prompt advances even when the decodes
alone (or a loaded machine's fixed cost) exceed the target.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SHARE = 0.25  # of the target: the prefills' time even when the rest of the step fills or passes it
_AVERAGE = 0.2  # weight of the newest step in the running ms per token


@dataclass(frozen=True)
class StepShape:
    """What a step computed."""

    decodes: int
    prefill_tokens: int


class StepBudget:
    def __init__(self, target_ms: float, min_tokens: int) -> None:
        self.target_ms = target_ms
        self.min_tokens = min_tokens
        self.ms_per_token: float | None = None
        self.last: tuple[StepShape, float] | None = None  # the last measured step and its ms
        self.seen_tokens = 0  # the largest prefill a measured step carried
        self.steps = 0

    def observe(self, shape: StepShape, ms: float) -> None:
        """A step's measured wall time (ms) and what it carried."""
        tokens = shape.decodes + shape.prefill_tokens
        if tokens:
            rate = ms / tokens
            self.ms_per_token = rate if self.ms_per_token is None else (
                (1 - _AVERAGE) * self.ms_per_token + _AVERAGE * rate)
        self.last = (shape, ms)
        self.seen_tokens = max(self.seen_tokens, shape.prefill_tokens)
        self.steps += 1

    def cap(self) -> int:
        """The most prefill tokens a step may take: twice the largest measured."""
        return max(self.min_tokens, 2 * self.seen_tokens)

    def step_prefill(self, decodes: int) -> int:
        """Prefill tokens for a step with `decodes` decodes (before the caps)."""
        if self.last is None or self.ms_per_token is None:
            return self.cap()
        (shape, ms), rate = self.last, self.ms_per_token
        at_target = shape.prefill_tokens + (self.target_ms - ms - rate * (decodes - shape.decodes)) / rate
        least = MIN_SHARE * self.target_ms / rate
        return int(max(at_target, least))

    def prefill_tokens(self, decodes: int, placed: int, limit: int) -> int:
        """Tokens the next prefill of a step may take, beside `decodes` decodes and `placed` prefill
        tokens already in it, at most `limit`; at least `min_tokens` for the step's first."""
        floor = min(limit, self.min_tokens) if not placed else 0
        room = min(limit, self.cap() - placed, self.step_prefill(decodes) - placed)
        return max(floor, room)
