"""The seam between a MoE layer's gate and its routed experts.

A MoE layer hands the dispatcher its hidden states and top-k choice; the dispatcher returns
the combined routed-expert output. `LocalDispatcher` computes in-process and is the reference
for the distributed transports, which register here under their own names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from cluster.checkpoint import CheckpointReader
from cluster.errors import ConfigError
from cluster.experts import RoutedExperts


class Dispatcher(ABC):
    @abstractmethod
    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, K] (global expert ids), topk_weights [T, K] -> [T, H]."""

    def token_counts(self) -> dict[int, torch.Tensor]:
        """Routed (token, expert) pairs seen so far, per MoE layer: {layer: [E]}."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook; the in-process dispatcher holds nothing
        """Release transport resources."""


class LocalDispatcher(Dispatcher):
    def __init__(self, experts: dict[int, RoutedExperts]) -> None:
        self.experts = experts

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.experts[layer](hidden, topk_ids, topk_weights)

    def token_counts(self) -> dict[int, torch.Tensor]:
        return {layer: e.token_counts.clone() for layer, e in self.experts.items()}


DispatcherFactory = Callable[..., Dispatcher]
_REGISTRY: dict[str, DispatcherFactory] = {}


def register_transport(name: str, factory: DispatcherFactory) -> None:
    _REGISTRY[name] = factory


def transport_factory(name: str) -> DispatcherFactory:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown transport {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def load_local_dispatcher(reader: CheckpointReader) -> LocalDispatcher:
    """All routed experts of every MoE layer, in this process."""
    text = reader.config.text
    all_ids = list(range(text.n_routed_experts))
    experts = {}
    for layer in text.moe_layers:
        gate_up, down = reader.read_experts(layer, all_ids)
        experts[layer] = RoutedExperts(text.n_routed_experts, all_ids, gate_up, down)
    return LocalDispatcher(experts)


register_transport("local", load_local_dispatcher)
