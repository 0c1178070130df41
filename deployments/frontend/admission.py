"""Early refusal under overload: a count of generation requests in flight in this ingress replica,
checked before any work is queued, so a client past the limit hears 429 / RESOURCE_EXHAUSTED at
once instead of waiting in a queue."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from deployments.errors import BadRequest, Overloaded, Unavailable


class Admission:
    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.draining = False  # set once by a graceful stop (deployments/frontend/drain.py), never cleared

    def enter(self) -> Ticket:
        """Admits one request or raises Overloaded (full) or Unavailable (draining); the caller must
        release the ticket exactly once (it is idempotent, so finally-blocks on several paths may
        all call it)."""
        if self.draining:
            raise Unavailable("this server is shutting down; retry the request", retry_after_s=self.retry_after_s)
        # Single-threaded event loop: no await between the check and the increment.
        if self.in_flight >= self.limit:
            raise Overloaded(f"too many requests in flight ({self.limit}); retry later",
                             retry_after_s=self.retry_after_s)
        self.in_flight += 1
        return Ticket(self)

    def drain(self) -> None:
        """From now on every request is refused with Unavailable (a graceful stop)."""
        self.draining = True


class Ticket:
    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None


class TokenBudget:
    """Long-context admission: prompt tokens (each choice counted) of the requests in flight in
    this ingress replica. A request that alone exceeds the budget can never run here (400); one
    that does not fit beside the others is refused at once (429 + Retry-After)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.used = 0

    def take(self, tokens: Sequence[int], param: str) -> list[Callable[[], None]]:
        """Takes the tokens of each stream; returns one idempotent release per stream."""
        total = sum(tokens)
        if total > self.limit:
            raise BadRequest(f"{param}: {total} prompt tokens (all choices) exceed this server's prompt_token_budget "
                             f"of {self.limit}", param)
        if self.used + total > self.limit:
            raise Overloaded(f"prompt token budget full ({self.used} of {self.limit} tokens in flight); retry later",
                             retry_after_s=self.retry_after_s)
        self.used += total
        return [self._releaser(t) for t in tokens]

    def _releaser(self, tokens: int) -> Callable[[], None]:
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.used -= tokens

        return release
