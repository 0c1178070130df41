"""The seam between MLA and the kernels that attend: what a step hands an attention backend and what
a backend returns. Backends are chosen by name (`cluster.model.attention.make_attention_backend`).

Everything here is in latent space over the paged cache `[num_blocks, block_size, c + r]` per layer
(`c = kv_lora_rank` normed latent, then `r = qk_rope_head_dim` rotated rope key): queries arrive
absorbed (`[n, h, c + r]`: W_UK multiplied into the nope part, then the rotated rope part, the
softmax scale not yet applied) and a backend returns the attended latents `[n, h, c]`; MLA applies
W_UV after. The one exception is a sequence's first chunk: with no context before it, expanding its
own latents per head costs less than latent space, so it comes with keys and values per head.
Contexts are named by block tables and lengths, so a paged kernel reads them directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqSpan:
    """One sequence with several new tokens this step (a prefill chunk): rows [start, start + num_new)
    of the flat batch, at positions context_len - num_new .. context_len - 1; each attends causally
    to the sequence's first context_len cached tokens (its own latents are written before)."""

    start: int
    num_new: int
    context_len: int
    block_table: torch.Tensor  # [W] int64, at least ceil(context_len / block_size) blocks


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences advancing by one token: each attends to its first context_lens[i] cached tokens (the
    last its own). Tables are padded with block 0 past each sequence's blocks."""

    rows: torch.Tensor  # [B] their rows in the flat batch
    block_tables: torch.Tensor  # [B, W] int64
    context_lens: torch.Tensor  # [B] int64, each >= 1
    longest: int  # max(context_lens), known without reading the tensor
    total: int | None = None  # sum(context_lens) where the host knows it (None: read from the tensor)


@dataclass(frozen=True)
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each new token's latent is written
    spans: tuple[SeqSpan, ...]  # sequences with several new tokens (prefill chunks)
    decode: DecodeBatch | None
    cos: torch.Tensor  # [T, rope]
    sin: torch.Tensor  # [T, rope]
    query_scale: torch.Tensor  # [T]


class AttentionBackend(ABC):
    """Softmax attention of absorbed queries over cached latents. One instance serves every layer
    of a model (each call names its layer's cache), so a backend may keep per-step plans keyed by
    the step's (immutable) metadata objects."""

    # Whether `decode` makes no host sync and its launch shapes depend only on the batch size and
    # `DecodeBatch.longest`, so a CUDA graph can capture it.
    graph_safe: bool = False

    @abstractmethod
    def prefill(self, query: torch.Tensor, cache: torch.Tensor, span: SeqSpan, kv_lora_rank: int,
                scale: float) -> torch.Tensor:
        """query [n, h, c+r] (the span's rows), cache [NB, BS, c+r] -> latents [n, h, c]."""

    def prefill_fresh(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """A sequence's first chunk, nothing cached before it: causal attention over its own keys and
        values, expanded per head (query, key [n, h, qk], value [n, h, v]) -> [n, h, v]. SDPA unless
        a backend has better."""
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True, scale=scale)
        return out.transpose(0, 1)

    @abstractmethod
    def decode(self, query: torch.Tensor, cache: torch.Tensor, batch: DecodeBatch, kv_lora_rank: int,
               scale: float) -> torch.Tensor:
        """query [B, h, c+r] (the batch's rows), cache [NB, BS, c+r] -> latents [B, h, c]."""
