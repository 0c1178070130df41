"""The `triton` attention backend: decodes through the Triton MLA kernel over the paged latent
cache (`cluster.model.mla_triton`); prefill chunks run the torch backend's latent-space attention,
eagerly, as they do under CUDA graphs."""

from __future__ import annotations

import torch

from cluster.errors import ConfigError
from cluster.model import mla_triton
from cluster.model.attention_backend import AttentionBackend, DecodeBatch, SeqSpan
from cluster.model.torch_attention import TorchAttention


class TritonAttention(AttentionBackend):
    graph_safe = True  # the kernel's splits follow `longest`, which a decode graph fixes at max_model_len

    def __init__(self) -> None:
        if not mla_triton.available():
            raise ConfigError("attention backend 'triton' needs the triton package (pip install triton)")
        self._prefill = TorchAttention()

    def prefill(self, query: torch.Tensor, cache: torch.Tensor, span: SeqSpan, kv_lora_rank: int,
                scale: float) -> torch.Tensor:
        return self._prefill.prefill(query, cache, span, kv_lora_rank, scale)

    def decode(self, query: torch.Tensor, cache: torch.Tensor, batch: DecodeBatch, kv_lora_rank: int,
               scale: float) -> torch.Tensor:
        """query [B, h, c+r] -> latents [B, h, c], read straight from the block tables."""
        return mla_triton.mla_decode(query, cache, batch.block_tables, batch.context_lens, scale, kv_lora_rank,
                                     longest=batch.longest)
