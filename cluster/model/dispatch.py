"""The seam between a MoE layer's gate and its routed experts.

A MoE layer hands the dispatcher its hidden states and top-k choice; the dispatcher returns
the combined routed-expert output. Implementations (in-process and the distributed transports)
live in `cluster.experts`; the engine is handed one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExchangeFailedError(RuntimeError):
    """An expert exchange missed its deadline or lost a shard; the step can be re-run once the
    group is re-formed (every write of a step goes to fixed cache slots, so a re-run is exact)."""


class Dispatcher(ABC):
    @abstractmethod
    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, K] (global expert ids), topk_weights [T, K] -> [T, H]."""

    def token_counts(self) -> dict[int, torch.Tensor]:
        """Routed (token, expert) pairs seen so far, per MoE layer: {layer: [E]}."""
        return {}

    def graph_safe(self) -> bool:
        """Whether `dispatch` makes no host sync and leaves no device, so a step can be captured
        in a CUDA graph (in-process experts only; an exchange with other processes cannot be)."""
        return False

    def recover(self) -> None:
        """Re-forms the group after `ExchangeFailedError`; transports without peers cannot fail."""
        raise NotImplementedError(f"{type(self).__name__} cannot recover from a failed exchange")

    def close(self) -> None:  # noqa: B027 - optional hook; the in-process dispatcher holds nothing
        """Release transport resources."""
