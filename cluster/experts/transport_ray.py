"""The `ray` transport: engines exchange rows with shard actors directly, M:N. Several engines
share one set of shards; a shard coalesces the requests for the same layer that arrive together
from several engines into one grouped computation. The rows travel over a persistent TCP
connection per (engine, shard), proven with the group's secret (wire.py); Ray actor calls carry
only control (the shard's address, ping, replacement). Each exchange has a deadline; a failed shard raises
`ExchangeFailedError` so the engine can re-form the group and re-run its step."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.experts.devices import PinnedStaging
from cluster.experts.dispatchers import RemoteDispatcher
from cluster.experts.placement import ExpertPlacement
from cluster.experts.shard import ExpertShard, split_by_rank
from cluster.experts.wire import ExchangeClient, WireError, WireSecret
from cluster.model.dispatch import ExchangeFailedError


@dataclass
class _Pending:
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None

    def outcome(self) -> torch.Tensor:
        """This call's rows of its batch's result, or the batch's error."""
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("a coalesced batch finished without this call's rows")
        return self.result


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
            return me.outcome()
        try:
            out = self.shard.compute_moved(layer, torch.cat([p.hidden for p in batch]),
                                           torch.cat([p.ids for p in batch]), torch.cat([p.weights for p in batch]))
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
        return me.outcome()


class RayDispatcher(RemoteDispatcher):
    """An engine's side: sends each shard its rows over the shard's connection, then collects the
    partial sums, all under one deadline."""

    def __init__(self, placement: ExpertPlacement, shards: list[Any], secret: WireSecret,
                 deadline_s: float = 30.0) -> None:
        super().__init__(placement, deadline_s)
        self.shards = list(shards)
        self._secret = secret
        self._clients: dict[int, ExchangeClient] = {}
        self._outbound, self._inbound = PinnedStaging(), PinnedStaging()  # a GPU engine's host copies

    def _client(self, rank: int, deadline: float) -> ExchangeClient:
        import ray

        client = self._clients.get(rank)
        if client is None:  # control: ask the shard actor where its exchange server listens
            address = ray.get(self.shards[rank].exchange_address.remote(), timeout=_left(deadline))
            client = self._clients[rank] = ExchangeClient(tuple(address), self._secret, _left(deadline))
        return client

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        import ray

        deadline = time.monotonic() + self.deadline_s
        # The rows travel in the engine's dtype (bf16 on GPUs). A GPU engine's leave in one copy
        # through pinned host memory and its answer returns in one; the split is made on the host.
        rows_host = self._outbound.to_host(hidden)  # [T, H]
        ids_host, weights_host = topk_ids.cpu(), topk_weights.cpu()  # [T, K]
        shares = [s for s in split_by_rank(self.placement, layer, ids_host, weights_host) if s.rows.numel()]
        try:
            clients = [self._client(s.rank, deadline) for s in shares]
            for share, client in zip(shares, clients, strict=True):  # every shard first: they compute in parallel
                client.send(layer, rows_host[share.rows], share.topk_ids, share.topk_weights, _left(deadline))
            parts = [client.receive(_left(deadline)) for client in clients]  # each [n_r, H]
        except (WireError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                ray.exceptions.ActorUnavailableError) as exc:
            self._disconnect()  # a connection's state is unknown after a failure: start afresh
            raise ExchangeFailedError(f"layer {layer}: expert exchange failed ({type(exc).__name__}: {exc})") from exc
        total = torch.zeros(hidden.shape, dtype=torch.float32)  # [T, H] partial sums of the ranks, in fp32
        for share, part in zip(shares, parts, strict=True):
            total.index_add_(0, share.rows, part.float())
        self.routed.add(layer, ids_host)
        if hidden.device.type == "cpu":
            return total.to(hidden.dtype)
        staged = self._inbound.take(total.numel() * hidden.element_size()).view(hidden.dtype).view(total.shape)
        staged.copy_(total)
        return self._inbound.to_device(staged, hidden.device)

    def replace_shards(self, shards: list[Any], secret: WireSecret) -> None:
        """New shards (a replaced one, or a new registry's, which comes with a new secret)."""
        self._disconnect()
        self.shards = list(shards)
        self._secret = secret

    def close(self) -> None:
        self._disconnect()
        self._after_close()

    def _disconnect(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _left(deadline: float) -> float:
    """Seconds left before `deadline`; an exchange past it fails as a timeout."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise WireError("exchange deadline passed")
    return left
