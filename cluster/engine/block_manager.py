"""Paged latent KV cache bookkeeping: per-sequence block tables over a pool of reference-counted,
fixed-size blocks, and the prefix cache over them.

A block is held by every table that lists it, and its reference count is the number of those
tables. The `n` choices of one request share their prompt's full blocks that way, and so do
requests whose prompts start alike (the prefix cache). A shared block is always full for every
table that holds it, so it is never written again: a sequence only writes past its shared part,
into blocks of its own.

The prefix cache: once a sequence has computed a full block, the block is registered under its
content key (`cluster.engine.prefix_hash`: parent key, token ids, image pixel hashes, cache salt).
A new sequence takes the blocks of its longest cached prefix into its table (`ensure(..., reuse=)`)
instead of computing them. A block whose count drops to zero goes to the back of the free list,
still cached and findable by its key; allocation takes from the front, so the least recently freed
block is reused (and its key forgotten: evicted) first, and taking a cached block back off the
free list (`OrderedDict.pop`) makes the free list the cache's LRU order. A sequence's blocks are
freed last block first, so its later blocks are evicted before the prefix they extend.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from cluster.model.config import TextConfig


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens (the request router counts with it too)."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, int] = {}  # tokens each table was last sized for
        self._cached: dict[bytes, int] = {}  # content key -> block
        self._key_of: dict[int, bytes] = {}  # block -> content key (the inverse)
        self._registered: dict[int, int] = {}  # blocks of each table `cache_blocks` has looked at
        self.num_evictions = 0  # cached blocks reused for other content

    @property
    def num_cached(self) -> int:
        """Blocks findable by their content (held or free)."""
        return len(self._cached)

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

    def cached_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first on, name cached blocks (the longest cached prefix)."""
        if not self.caching:
            return 0
        n = 0
        for key in keys:
            if key not in self._cached:
                break
            n += 1
        return n

    def ensure(self, seq_id: int, num_tokens: int, reuse: Sequence[bytes] = ()) -> bool:
        """Grows `seq_id`'s table to hold `num_tokens`; allocates nothing and returns False when
        the pool is short. `reuse`: keys of cached blocks (`cached_prefix`) that start a table not
        made yet; they are taken off the free list where no table holds them, and only the rest is
        allocated."""
        table = self._tables.get(seq_id)
        if reuse and table is not None:
            raise ValueError(f"sequence {seq_id} already holds blocks; cached blocks only start a table")
        hits = [self._cached[key] for key in reuse]
        reclaimed = sum(1 for block in hits if self._refs[block] == 0)
        need = self.blocks_for(num_tokens) - (len(table) if table is not None else len(hits))
        if need + reclaimed > len(self._free):
            return False
        if table is None:
            table = self._tables[seq_id] = []
        for block in hits:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            table.append(block)
        if hits:
            self._registered[seq_id] = len(hits)
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            key = self._key_of.pop(block, None)
            if key is not None:  # the least recently used cached block: evicted
                del self._cached[key]
                self.num_evictions += 1
            self._refs[block] = 1
            table.append(block)
        self._tokens[seq_id] = max(num_tokens, self._tokens.get(seq_id, 0))
        return True

    def cache_blocks(self, seq_id: int, keys: Sequence[bytes], num_full: int) -> None:
        """Registers the first `num_full` blocks of `seq_id`'s table, now computed, under `keys`
        (the sequence's block keys). A key already cached in another block (the same content
        computed twice at once) leaves this block uncached, as vLLM does."""
        if not self.caching:
            return
        table = self._tables.get(seq_id)
        if table is None:
            return
        num_full = min(num_full, len(keys), len(table))
        for i in range(self._registered.get(seq_id, 0), num_full):
            block, key = table[i], keys[i]
            if block not in self._key_of and key not in self._cached:
                self._cached[key] = block
                self._key_of[block] = key
        self._registered[seq_id] = max(num_full, self._registered.get(seq_id, 0))

    def key_of(self, block: int) -> bytes | None:
        return self._key_of.get(block)

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
        self._registered.pop(seq_id, None)
        for block in reversed(self._tables.pop(seq_id, ())):  # the later blocks are evicted first
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
        self._check_cache()

    def _check_cache(self) -> None:
        """The key maps are each other's inverse; a cached block is full in every table holding it."""
        if not self.caching and self._cached:
            raise RuntimeError("prefix caching is off but blocks are cached")
        if len(self._cached) != len(self._key_of) or any(self._key_of.get(b) != k for k, b in self._cached.items()):
            raise RuntimeError("the prefix cache's key -> block and block -> key maps disagree")
        for seq_id, table in self._tables.items():
            full = self._tokens[seq_id] // self.block_size
            for i, block in enumerate(table):
                if block in self._key_of and i >= full:
                    raise RuntimeError(f"cached block {block} is not full in sequence {seq_id}'s table "
                                       f"(position {i}, {self._tokens[seq_id]} tokens)")
        if not set(self._registered) <= set(self._tables):
            raise RuntimeError("registration marks name sequences that hold no blocks")


def cache_bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    return text.num_hidden_layers * block_size * text.latent_dim * torch.finfo(dtype).bits // 8
