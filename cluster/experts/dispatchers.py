"""Dispatcher implementations: `LocalDispatcher` computes in-process and is the reference for
the distributed transports; `RemoteDispatcher` is what those transports share. Transports are
chosen by name (`transport_factory`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.errors import ConfigError
from cluster.experts.placement import ExpertPlacement
from cluster.experts.shard import ExpertShard, split_by_rank
from cluster.model.checkpoint import CheckpointReader
from cluster.model.config import load_model_config
from cluster.model.dispatch import Dispatcher, ExchangeFailedError
from cluster.model.weight_source import WeightSource


class LocalDispatcher(Dispatcher):
    """In-process expert shards: with one shard it holds every expert; with several it splits
    each layer's tokens by placement exactly as the distributed transports do and sums."""

    def __init__(self, placement: ExpertPlacement, shards: list[ExpertShard]) -> None:
        self.placement = placement
        self.shards = shards

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        if len(self.shards) == 1:  # every expert here, every slot of the gate's choice ours
            return self.shards[0].compute(layer, hidden, topk_ids, topk_weights, every_slot=True)
        out = torch.zeros_like(hidden)
        for share in split_by_rank(self.placement, layer, topk_ids, topk_weights):
            if share.rows.numel():
                part = self.shards[share.rank].compute(layer, hidden[share.rows], share.topk_ids, share.topk_weights)
                out.index_add_(0, share.rows, part)
        return out

    def token_counts(self) -> dict[int, torch.Tensor]:
        return {layer: c.cpu() for layer, c in sum_counts([s.token_counts() for s in self.shards]).items()}

    def graph_safe(self) -> bool:
        return len(self.shards) == 1 and self.shards[0].graph_safe()


class RoutedCounter:
    """The (token, expert) pairs an engine sent to shards in other processes, per MoE layer: the
    expert load as the engine sees it (the shards count too, but their counts live over there)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._counts: dict[int, torch.Tensor] = {}

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        ids = topk_ids[topk_ids >= 0].flatten().cpu()  # [pairs]
        counts = torch.bincount(ids, minlength=self.num_experts)  # [E]
        self._counts[layer] = self._counts[layer] + counts if layer in self._counts else counts

    def totals(self) -> dict[int, torch.Tensor]:
        return {layer: c.clone() for layer, c in self._counts.items()}

    def pairs(self) -> dict[int, int]:
        return {layer: int(c.sum()) for layer, c in self._counts.items()}


class RemoteDispatcher(Dispatcher):
    """What the transports to shards in other processes share: the pairs they route (their
    token counts), `on_failure` (set by the group that can re-form them: `recover()` calls it) and
    `on_close` (called once the transport has let go: e.g. to release a group the engine owns)."""

    def __init__(self, placement: ExpertPlacement, deadline_s: float) -> None:
        self.placement = placement
        self.deadline_s = deadline_s
        self.routed = RoutedCounter(placement.num_experts)
        self.on_failure: Callable[[Any], None] | None = None
        self.on_close: Callable[[], None] | None = None

    def token_counts(self) -> dict[int, torch.Tensor]:
        return self.routed.totals()

    @property
    def pairs_sent(self) -> dict[int, int]:
        return self.routed.pairs()

    def recover(self) -> None:
        if self.on_failure is None:
            raise ExchangeFailedError("no way to re-form this group (no on_failure handler)")
        self.on_failure(self)

    def _after_close(self) -> None:
        if self.on_close is not None:
            self.on_close()


def sum_counts(per_shard: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    total: dict[int, torch.Tensor] = {}
    for counts in per_shard:
        for layer, c in counts.items():
            total[layer] = total[layer] + c if layer in total else c.clone()
    return total


DispatcherFactory = Callable[..., Dispatcher]
_REGISTRY: dict[str, DispatcherFactory] = {}


def register_transport(name: str, factory: DispatcherFactory) -> None:
    _REGISTRY[name] = factory


def transport_factory(name: str) -> DispatcherFactory:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown transport {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def load_local_dispatcher(source: WeightSource | str | Path, num_shards: int = 1, cache_bytes: int = 0,
                          device: torch.device | str | None = None, dtype: torch.dtype | None = None
                          ) -> LocalDispatcher:
    """Every routed expert in this process (from a model directory or an open weight source), over
    `num_shards` contiguous in-process shards (`cache_bytes`, `device`, `dtype`: see `ExpertShard`;
    the engine's device and dtype, so hidden states never leave the device)."""
    reader = CheckpointReader(source, load_model_config(source)) if isinstance(source, str | Path) else source
    text = reader.config.text
    placement = ExpertPlacement.of_model(text, num_shards)
    where = None if device is None else torch.device(device)
    return LocalDispatcher(placement, [ExpertShard(reader, placement, r, cache_bytes, where, dtype)
                                       for r in range(num_shards)])


register_transport("local", load_local_dispatcher)
