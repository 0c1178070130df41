"""Paged latent KV cache: block tables per sequence over a shared pool of fixed-size blocks."""

from __future__ import annotations

from collections import deque

import torch

from cluster.model.config import TextConfig


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def ensure(self, seq_id: str, num_tokens: int) -> bool:
        """Grows `seq_id`'s table to hold `num_tokens`; allocates nothing and returns False when
        the pool is short."""
        table = self._tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self._tables[seq_id]
            return False
        table.extend(self._free.popleft() for _ in range(max(need, 0)))
        return True

    def free(self, seq_id: str) -> None:
        self._free.extend(self._tables.pop(seq_id, []))

    def slots(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Cache slots (block * block_size + offset) of token positions [start, end)."""
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def check_integrity(self) -> None:
        owned = [b for t in self._tables.values() for b in t]
        free = list(self._free)
        every = owned + free
        if len(every) != self.num_blocks or set(every) != set(range(self.num_blocks)):
            raise RuntimeError(f"block accounting broken: {len(owned)} owned + {len(free)} free, "
                               f"{len(set(every))} distinct of {self.num_blocks}")
        if any(not t for t in self._tables.values()):
            raise RuntimeError("a sequence holds an empty block table")


def allocate_caches(text: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """One latent cache per layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
    return [torch.zeros(num_blocks, block_size, text.latent_dim, dtype=dtype)
            for _ in range(text.num_hidden_layers)]


def cache_bytes_per_block(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    return text.num_hidden_layers * block_size * text.latent_dim * torch.finfo(dtype).bits // 8
