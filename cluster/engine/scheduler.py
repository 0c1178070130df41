"""Continuous batching with chunked prefill under a per-step token budget.

Each step, running sequences go first (a decode needs one token, an unfinished prefill takes
what budget is left), then waiting ones are admitted while the budget, the running cap and the
KV pool allow; a sequence admitted from scratch starts after its longest cached prefix
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


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_queried_tokens = 0  # tokens of sequences admitted from scratch (prefix cache lookups)
        self.num_cached_tokens = 0  # of those, tokens the prefix cache gave

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

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            while not self.blocks.ensure(seq.seq_id, seq.num_computed + n):
                done = {s.seq for s in scheduled}
                victims = [s for s in self.running if s not in done and s is not seq]
                self._preempt(victims[-1] if victims else seq)
                if not victims:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        width = self._width()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if width + 1 + len(seq.forks) > self.config.max_num_seqs:
                break
            reuse = self._cached_prefix(seq)
            start = seq.num_computed + len(reuse) * self.blocks.block_size
            n = min(len(seq.token_ids) - start, budget)
            if not self.blocks.ensure(seq.seq_id, start + n, reuse):
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
