"""The `ray` transport: routers call shard actors directly, M:N. Several routers share one set
of shards; a shard coalesces the calls for the same layer that arrive together from several
routers into one grouped computation. Each exchange has a deadline; a failed shard raises
`ExchangeFailedError` so the router can re-form the group and re-run its step."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cluster.dispatch import Dispatcher, ExchangeFailedError
from cluster.expert_shard import ExpertShard, split_by_rank
from cluster.placement import ExpertPlacement


@dataclass
class _Pending:
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Coalescer:
    """Calls for one layer that arrive while a batch for it is forming are computed together:
    the first caller waits `window_s` for others, then computes all rows in one grouped pass."""

    def __init__(self, shard: ExpertShard, window_s: float = 0.0005) -> None:
        self.shard = shard
        self.window_s = window_s
        self._lock = threading.Condition()
        self._forming: dict[int, list[_Pending]] = {}
        self.batches = 0
        self.calls = 0

    def compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        me = _Pending(hidden, ids, weights)
        with self._lock:
            self.calls += 1
            batch = self._forming.setdefault(layer, [])
            batch.append(me)
            leader = len(batch) == 1
            if leader:
                self._lock.wait(self.window_s)
                del self._forming[layer]
        if not leader:
            me.done.wait()
            if me.error is not None:
                raise me.error
            return me.result
        try:
            out = self.shard.compute(layer, torch.cat([p.hidden for p in batch]), torch.cat([p.ids for p in batch]),
                                     torch.cat([p.weights for p in batch]))
            start = 0
            for p in batch:
                p.result = out[start:start + p.hidden.shape[0]]
                start += p.hidden.shape[0]
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch must hear of it
            for p in batch:
                p.error = exc
            raise
        finally:
            self.batches += 1
            for p in batch[1:]:
                p.done.set()
        return me.result


class RayDispatcher(Dispatcher):
    """A router's side: one actor call per shard with rows, all awaited under one deadline."""

    def __init__(self, placement: ExpertPlacement, shards: list[Any], deadline_s: float = 30.0) -> None:
        self.placement = placement
        self.shards = list(shards)
        self.deadline_s = deadline_s
        self.pairs_sent: dict[int, int] = {}
        self.on_failure: Callable[[RayDispatcher], None] | None = None

    def recover(self) -> None:
        if self.on_failure is None:
            raise ExchangeFailedError("no way to re-form this group (no on_failure handler)")
        self.on_failure(self)

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        import ray

        shares = [s for s in split_by_rank(self.placement, layer, topk_ids, topk_weights) if s.rows.numel()]
        refs = [self.shards[s.rank].compute.remote(layer, hidden[s.rows].numpy(), s.topk_ids.numpy(),
                                                   s.topk_weights.numpy()) for s in shares]
        try:
            parts = ray.get(refs, timeout=self.deadline_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                ray.exceptions.ActorUnavailableError) as exc:
            for r in refs:
                ray.cancel(r, force=False)
            raise ExchangeFailedError(f"layer {layer}: expert exchange failed ({type(exc).__name__})") from exc
        out = torch.zeros_like(hidden)
        for share, part in zip(shares, parts, strict=True):
            out.index_add_(0, share.rows, torch.from_numpy(part).to(hidden.dtype))
        self.pairs_sent[layer] = self.pairs_sent.get(layer, 0) + int((topk_ids >= 0).sum())
        return out

    def replace_shards(self, shards: list[Any]) -> None:
        self.shards = list(shards)


def shard_compute(coalescer: Coalescer, layer: int, hidden: np.ndarray, ids: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """The shard actor's entry point for one router's rows of one layer."""
    out = coalescer.compute(layer, torch.from_numpy(hidden), torch.from_numpy(ids), torch.from_numpy(weights))
    return out.numpy()
