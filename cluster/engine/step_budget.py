"""How many prefill tokens a step may take so that its time stays near `target_step_ms`.

The engine feeds every step's measured time to a linear model of step time,

    ms = fixed + per_decode * decodes + per_token * prefill_tokens + per_attention * attention_work

where `attention_work` is the prefill chunks' attention terms, sum of chunk x (context before it
+ chunk / 2) in K-token units (a chunk attends to its context and, causally, to itself), fitted
by exponentially weighted least squares (recent steps count most; a small ridge keeps it
defined before the data tells the terms apart). The scheduler places the decodes first, then
asks how many prefill tokens fit the time left.

Two guards keep a wrong model from hurting the streams, and the streams from stalling a prompt:
a step's prefill is at most twice the largest prefill of a measured step, so the model never
extrapolates far and an untried size is approached by doubling; and every step still carries at
least `min_tokens` of prefill, so a long prompt advances even when the decodes alone exceed the
target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SCALE = (1.0, 64.0, 1024.0, 4096.0)  # the features to comparable magnitudes
_DECAY = 0.97  # weight of a step 23 steps ago: about a half
_RIDGE = 1e-3


@dataclass(frozen=True)
class StepShape:
    """What a step computed, in the terms of the step-time model."""

    decodes: int
    prefill_tokens: int
    attention_work: float  # sum over prefill chunks of chunk x (context before + chunk / 2), in K-tokens

    def features(self) -> list[float]:
        raw = (1.0, float(self.decodes), float(self.prefill_tokens), self.attention_work)
        return [x / s for x, s in zip(raw, _SCALE, strict=True)]


def chunk_work(context: int, chunk: int) -> float:
    """A prefill chunk's attention term: chunk x (context before it + chunk / 2), in K-tokens."""
    return chunk * (context + chunk / 2) / 1024.0


class StepBudget:
    def __init__(self, target_ms: float, min_tokens: int) -> None:
        self.target_ms = target_ms
        self.min_tokens = min_tokens
        n = len(_SCALE)
        self._gram = torch.eye(n, dtype=torch.float64) * _RIDGE  # weighted X^T X (ridge included)
        self._moment = torch.zeros(n, dtype=torch.float64)  # weighted X^T y
        self._coef = torch.zeros(n, dtype=torch.float64)
        self.seen_tokens = 0  # the largest prefill a measured step carried
        self.steps = 0

    # -- fed by the engine ---------------------------------------------------------------------

    def observe(self, shape: StepShape, ms: float) -> None:
        x = torch.tensor(shape.features(), dtype=torch.float64)
        ridge = torch.eye(len(_SCALE), dtype=torch.float64) * _RIDGE
        self._gram = (self._gram - ridge) * _DECAY + torch.outer(x, x) + ridge
        self._moment = self._moment * _DECAY + x * ms
        self._coef = torch.linalg.solve(self._gram, self._moment)
        self.steps += 1
        self.seen_tokens = max(self.seen_tokens, shape.prefill_tokens)

    # -- asked by the scheduler ----------------------------------------------------------------

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """fixed (ms), per decode, per prefill token, per K-token of attention work (ms each)."""
        c = [float(v) / s for v, s in zip(self._coef, _SCALE, strict=True)]
        return c[0], c[1], c[2], c[3]

    def predict_ms(self, shape: StepShape) -> float:
        fixed, per_decode, per_token, per_work = self.coefficients
        return (fixed + per_decode * shape.decodes + max(per_token, 0.0) * shape.prefill_tokens
                + max(per_work, 0.0) * shape.attention_work)

    def cap(self) -> int:
        """The most prefill tokens a step may take: twice the largest the model has seen measured."""
        return max(self.min_tokens, 2 * self.seen_tokens)

    def prefill_tokens(self, decodes: int, chunks: list[tuple[int, int]], context: int, limit: int) -> int:
        """Tokens a prefill at `context` may take this step, beside `decodes` decodes and the
        `chunks` ((context, tokens)) already placed, at most `limit`; at least `min_tokens` for
        the step's first prefill (a long prompt advances every step)."""
        placed = sum(n for _, n in chunks)
        room = min(limit, self.cap() - placed)
        floor = min(limit, self.min_tokens) if not chunks else 0
        if room <= floor:
            return floor
        fixed, per_decode, per_token, per_work = self.coefficients
        per_token, per_work = max(per_token, 0.0), max(per_work, 0.0)
        spent = (fixed + per_decode * decodes + per_token * placed
                 + per_work * sum(chunk_work(c, n) for c, n in chunks))
        left = self.target_ms - spent
        if left <= 0:
            return floor
        # Largest n with per_token * n + per_work * n * (context + n / 2) / 1024 <= left.
        a, b = per_work / 2048.0, per_token + per_work * context / 1024.0
        if a > 0:
            n = int((-b + (b * b + 4 * a * left) ** 0.5) / (2 * a))
        elif b > 0:
            n = int(left / b)
        else:
            n = room
        return max(floor, min(room, n))
