"""Continuous batching with chunked prefill under a per-step token budget.

Each step, running decodes go first (a token each), then unfinished prefills take what budget is
left, then waiting ones are admitted while the budget, the running cap and the KV pool allow.
With `target_step_ms`, prefills also share a budget that keeps the step's time near it, learnt
from the engine's measured step times (`step_budget.py`); the step's first prefill still takes at
least `min_prefill_tokens`, so a long prompt advances every step without stalling the streams.
A sequence admitted from scratch starts after its longest cached prefix
(`BlockManager`'s prefix cache), so only the rest is prefilled. When blocks run out, the most
recently admitted running sequence is preempted: its blocks are freed (its computed full blocks
stay cached) and it is recomputed later from its tokens so far.

A request with `n` choices is admitted as one sequence that counts `n` against `max_num_seqs`;
once its prompt is prefilled the engine forks the other choices from it (`add_forked`), and they
run from then on as sequences of their own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import Sequence, Status
from cluster.engine.step_budget import StepBudget, StepShape


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, from seq.num_computed on

    @property
    def completes(self) -> bool:
        """True when this step reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed + self.num_new == len(self.seq.token_ids)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    target_step_ms: float | None = None  # None: the token cap alone
    min_prefill_tokens: int = 32


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_queried_tokens = 0  # tokens of sequences admitted from scratch (prefix cache lookups)
        self.num_cached_tokens = 0  # of those, tokens the prefix cache gave
        self.step_budget = (StepBudget(config.target_step_ms, config.min_prefill_tokens)
                            if config.target_step_ms is not None else None)
        self.last_shape = StepShape(0, 0)  # what the last schedule() placed, for observe_step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_forked(self, seq: Sequence) -> None:
        """A choice just forked from a running sequence (its shared blocks already in its table);
        its admission was counted with the sequence it was forked from."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence and frees its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def _width(self) -> int:
        """Sequences running now or once the running ones' pending choices are forked."""
        return sum(1 + len(s.forks) for s in self.running)

    def _cached_prefix(self, seq: Sequence) -> list[bytes]:
        """Keys of the cached blocks a sequence admitted from scratch starts with: its longest
        cached prefix, short of its last token (computed again for its logits, so a prompt cached
        to an exact block boundary recomputes its last block: a shared block is never written)."""
        if seq.num_computed or self.blocks.num_held(seq.seq_id) or not self.blocks.caching:
            return []
        keys = seq.block_keys[:(len(seq.token_ids) - 1) // self.blocks.block_size]
        return keys[:self.blocks.cached_prefix(keys)]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _prefill_take(self, decodes: int, placed: int, want: int) -> int:
        """Tokens of a prefill this step: what it wants, within the step-time budget."""
        if self.step_budget is None or want <= 1:
            return want
        return self.step_budget.prefill_tokens(decodes, placed, want)

    def observe_step(self, ms: float) -> None:
        """The last scheduled step's measured time (the engine's), which the prefill budget adapts to."""
        if self.step_budget is not None:
            self.step_budget.observe(self.last_shape, ms)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        placed = decodes = 0  # prefill tokens and decodes in the step so far
        # Decodes first (a token each), then the unfinished prefills in admission order.
        for seq in sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed > 1):
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = self._prefill_take(decodes, placed, min(len(seq.token_ids) - seq.num_computed, budget))
            if n == 0:  # the step's time is spent: the other prefills wait a step
                continue
            while not self.blocks.ensure(seq.seq_id, seq.num_computed + n):
                done = {s.seq for s in scheduled}
                victims = [s for s in self.running if s not in done and s is not seq]
                self._preempt(victims[-1] if victims else seq)
                if not victims:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                if len(seq.token_ids) - seq.num_computed > 1:
                    placed += n
                else:
                    decodes += 1
        width = self._width()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if width + 1 + len(seq.forks) > self.config.max_num_seqs:
                break
            reuse = self._cached_prefix(seq)
            start = seq.num_computed + len(reuse) * self.blocks.block_size
            n = self._prefill_take(decodes, placed, min(len(seq.token_ids) - start, budget))
            if n == 0 or not self.blocks.ensure(seq.seq_id, start + n, reuse):
                break
            if seq.num_computed == 0:  # admitted from scratch (new, or preempted): a prefix cache query
                self.num_queried_tokens += len(seq.token_ids)
                self.num_cached_tokens += start
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = start
            seq.num_computed = start
            width += 1 + len(seq.forks)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            if len(seq.token_ids) - start > 1:
                placed += n
            else:
                decodes += 1
        self.last_shape = StepShape(decodes, placed)
        return scheduled

    def check_integrity(self) -> None:
        self.blocks.check_integrity()
        ids = [s.seq_id for s in self.running] + [s.seq_id for s in self.waiting]
        if len(ids) != len(set(ids)):
            raise RuntimeError("a sequence is queued twice")
        for seq in self.waiting:
            if self.blocks.num_held(seq.seq_id) and seq.num_computed == 0:
                raise RuntimeError(f"waiting sequence {seq.request_id}#{seq.index} holds blocks")
        for seq in self.running:
            if self.blocks.num_held(seq.seq_id) < self.blocks.blocks_for(seq.num_computed):
                raise RuntimeError(f"running sequence {seq.request_id}#{seq.index} computed {seq.num_computed} "
                                   f"tokens into {self.blocks.num_held(seq.seq_id)} blocks")
        for seq in self.running:  # a cached block holds exactly the content its holder expects there
            for i, block in enumerate(self.blocks.table(seq.seq_id)[:len(seq.block_keys)]):
                key = self.blocks.key_of(block)
                if key is not None and key != seq.block_keys[i]:
                    raise RuntimeError(f"sequence {seq.request_id}#{seq.index} holds cached block {block} at "
                                       f"position {i} with another prefix's content")
        for seq in (*self.running, *self.waiting):
            if seq.forks and seq.num_output > 0:
                raise RuntimeError(f"sequence {seq.request_id} is past its prompt with choices not forked")
