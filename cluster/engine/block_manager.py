"""Paged latent KV cache bookkeeping: per-sequence block tables over a pool of reference-counted,
fixed-size blocks.

A block is held by every table that lists it, and its reference count is the number of those
tables. The `n` choices of one request share their prompt's full blocks that way. A shared block
is always full for every table that holds it, so it is never written again: a sequence only
writes past its shared part, into blocks of its own.

A block whose count drops to zero goes to the back of the free list, and allocation takes from
the front: the least recently freed block is reused first. A prefix cache can later keep freed
blocks findable by their content and take one back off the free list (`OrderedDict.pop`) until it
is reused, which makes the free list its LRU eviction order.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from cluster.model.config import TextConfig


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens (the request router counts with it too)."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}  # tokens each table was last sized for

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def num_held(self, seq_id: int) -> int:
        """Blocks in `seq_id`'s table (shared ones included)."""
        return len(self._tables.get(seq_id, ()))

    def table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._tables.get(seq_id, ()))

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        """Grows `seq_id`'s table to hold `num_tokens`; allocates nothing and returns False when
        the pool is short."""
        table = self._tables.get(seq_id)
        need = self.blocks_for(num_tokens) - (len(table) if table is not None else 0)
        if need > len(self._free):
            return False
        if table is None:
            table = self._tables[seq_id] = []
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            self._refs[block] = 1
            table.append(block)
        self._tokens[seq_id] = max(num_tokens, self._tokens.get(seq_id, 0))
        return True

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> int:
        """Starts `child_id`'s table with the parent's blocks that `num_tokens` tokens fill
        completely (a partial last block is not shared: the child recomputes those tokens into a
        block of its own). Returns the number of tokens the child now holds."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already holds blocks")
        full = min(num_tokens // self.block_size, len(self._tables.get(parent_id, ())))
        if full == 0:
            return 0
        shared = self._tables[parent_id][:full]
        for block in shared:
            self._refs[block] += 1
        self._tables[child_id] = shared
        self._tokens[child_id] = full * self.block_size
        return full * self.block_size

    def free(self, seq_id: int) -> None:
        """Drops `seq_id`'s table; blocks no other table holds go to the back of the free list."""
        self._tokens.pop(seq_id, None)
        for block in self._tables.pop(seq_id, ()):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def block_tables(self, seq_ids: list[int]) -> torch.Tensor:
        """The tables of `seq_ids` as one tensor [B, max blocks], padded with block 0."""
        tables = [self._tables[s] for s in seq_ids]
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)

    def check_integrity(self) -> None:
        holders = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            if not table:
                raise RuntimeError(f"sequence {seq_id} holds an empty block table")
            if len(set(table)) != len(table):
                raise RuntimeError(f"sequence {seq_id} lists a block twice: {table}")
            for block in table:
                holders[block] += 1
        if holders != self._refs:
            wrong = [b for b in range(self.num_blocks) if holders[b] != self._refs[b]]
            raise RuntimeError(f"reference counts broken for blocks {wrong[:8]}: counted "
                               f"{[self._refs[b] for b in wrong[:8]]}, held by {[holders[b] for b in wrong[:8]]}")
        unreferenced = {b for b in range(self.num_blocks) if self._refs[b] == 0}
        if unreferenced != set(self._free):
            raise RuntimeError(f"free list holds {len(self._free)} blocks, {len(unreferenced)} are unreferenced; "
                               f"in use but free: {sorted(set(self._free) - unreferenced)[:8]}, "
                               f"leaked: {sorted(unreferenced - set(self._free))[:8]}")
        for seq_id, table in self._tables.items():
            full = self._tokens[seq_id] // self.block_size
            for i, block in enumerate(table):
                if self._refs[block] > 1 and i >= full:
                    raise RuntimeError(f"block {block} is shared by {self._refs[block]} tables but is not full in "
                                       f"sequence {seq_id}'s (position {i}, {self._tokens[seq_id]} tokens)")
        if set(self._tokens) != set(self._tables):
            raise RuntimeError("token counts and block tables name different sequences")


def cache_bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    return text.num_hidden_layers * block_size * text.latent_dim * torch.finfo(dtype).bits // 8
