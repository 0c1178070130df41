"""The Mistral 4 text model over a flat batch of tokens from many sequences.

Parameter names mirror the checkpoint (relative to the text prefix), so loading is a plain
`load_state_dict`. Routed experts are not here: each MoE block calls a `Dispatcher`.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.errors import CheckpointError
from cluster.model.attention import MLAAttention, make_attention_backend
from cluster.model.attention_backend import AttentionBackend, AttentionMetadata
from cluster.model.config import TextConfig
from cluster.model.dispatch import Dispatcher
from cluster.model.layers import MLP, RMSNorm, Rope
from cluster.model.moe import MoEBlock
from cluster.model.weight_source import WeightSource


class DecoderLayer(nn.Module):
    def __init__(self, text: TextConfig, layer: int, rope: Rope, attention: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.self_attn = MLAAttention(text, rope, attention)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.mlp: nn.Module = MoEBlock(text, layer) if text.is_moe_layer(layer) \
            else MLP(text.hidden_size, text.intermediate_size)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor,
                dispatcher: Dispatcher) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, dispatcher) if isinstance(self.mlp, MoEBlock) else self.mlp(h))


class Mistral4TextModel(nn.Module):
    def __init__(self, text: TextConfig, attention_backend: str = "torch") -> None:
        super().__init__()
        self.config = text
        self.attention = make_attention_backend(attention_backend)  # one for every layer
        with torch.device("cpu"):  # rope tables are computed, never loaded: not on the meta device
            self.rope = Rope(text)
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(text, i, self.rope, self.attention)
                                    for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    @classmethod
    def from_reader(cls, reader: WeightSource, attention_backend: str = "torch") -> Mistral4TextModel:
        """Builds the model and loads the dense part (no routed experts) from the checkpoint (or dummy weights)."""
        text = reader.config.text
        with torch.device("meta"):
            model = cls(text, attention_backend)
        state = {k: v for k, v in reader.dense_state_dict().items() if v.numel() > 0}
        if "lm_head.weight" not in state and text.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{reader.model_dir}: checkpoint does not match config.json: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, param in model.state_dict().items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise CheckpointError(f"{reader.model_dir}: {name} has shape {tuple(state[name].shape)}, "
                                      f"config.json implies {tuple(param.shape)}")
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, caches: list[torch.Tensor],
                dispatcher: Dispatcher, logits_rows: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, H]) -> logits [S, V] for rows `logits_rows` [S]."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, H]
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, meta, cache, dispatcher)
        return self.lm_head(self.norm(x[logits_rows]))  # [S, V]
