"""The `deepspeed` transport: one engine (rank 0) and its N expert shards (ranks 1..N) form a
process group and step in lockstep: NCCL when the engine and the shards compute on GPUs (every
buffer below then lives on the member's GPU: no host round trip), gloo when all compute on CPUs
(`cluster.experts.devices.exchange_backend`; a mix is refused). Each MoE layer's exchange:

1. header all-to-all: the engine tells each shard (layer, rows it will receive); -1 stops it;
2. dispatch all-to-all: packed rows [n, H + 2K] (hidden, expert ids, weights) engine -> shards;
3. each shard computes its experts' weighted partial sums;
4. combine all-to-all: partial sums [n, H] shards -> engine, summed per token.

A member with no rows still joins every collective (with zero-row splits).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from cluster.experts.dispatchers import RemoteDispatcher
from cluster.experts.placement import ExpertPlacement
from cluster.experts.shard import ExpertShard, split_by_rank
from cluster.model.dispatch import ExchangeFailedError

STOP = -1
NOOP = -2  # keeps idle shards inside the collective's deadline


@dataclass(frozen=True)
class GroupAddress:
    master_addr: str
    master_port: int
    world_size: int  # engine + shards
    backend: str = "gloo"  # "nccl": every member's exchange buffers on its GPU


def init_group(address: GroupAddress, rank: int, timeout_s: float = 300.0) -> None:
    """Joins this process to its expert-parallel group through DeepSpeed's comm layer, with the
    group's backend (NCCL: on this process's current GPU, its first visible one under Ray)."""
    import deepspeed
    import deepspeed.comm as dist

    os.environ.update(MASTER_ADDR=address.master_addr, MASTER_PORT=str(address.master_port),
                      RANK=str(rank), WORLD_SIZE=str(address.world_size),
                      LOCAL_RANK=str(torch.cuda.current_device() if address.backend == "nccl" else 0))
    if address.backend == "nccl":
        torch.cuda.set_device(torch.cuda.current_device())  # NCCL binds its communicator to this GPU
    deepspeed.init_distributed(dist_backend=address.backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != address.world_size or dist.get_rank() != rank:
        raise RuntimeError(f"joined as rank {dist.get_rank()}/{dist.get_world_size()}, "
                           f"expected {rank}/{address.world_size}")


def leave_group() -> None:
    """Drops this process's process group (after a failure, before re-forming)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        import deepspeed.comm as dist

        dist.destroy_process_group()


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
    import deepspeed.comm as dist

    dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits)


class DeepSpeedDispatcher(RemoteDispatcher):
    """The engine's side (rank 0). Holds no expert weights. `device`: where its exchange buffers
    live, the engine's (a CUDA device with the nccl backend, the CPU with gloo)."""

    def __init__(self, placement: ExpertPlacement, hidden_size: int, top_k: int, deadline_s: float = 30.0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(placement, deadline_s)
        self.device = torch.device(device)
        self.world = placement.num_ranks + 1
        self.hidden_size, self.top_k = hidden_size, top_k
        self._closed = False
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._heartbeat = threading.Thread(target=self._beat, name="exchange-heartbeat", daemon=True)

    def join(self, address: GroupAddress) -> None:
        init_group(address, 0, self.deadline_s)
        self._last = time.monotonic()
        if not self._heartbeat.is_alive():
            self._heartbeat.start()

    def leave(self) -> None:
        leave_group()

    def recover(self) -> None:
        with self._lock:  # the heartbeat must not send while the group is re-formed
            super().recover()

    def _beat(self) -> None:
        while not self._closed:
            time.sleep(self.deadline_s / 4)
            with self._lock:
                if self._closed or time.monotonic() - self._last < self.deadline_s / 3:
                    continue
                try:
                    self._header(NOOP, [0] * self.world)
                except Exception:  # noqa: BLE001 - the next exchange fails too and re-forms the group
                    pass

    def _header(self, layer: int, counts: list[int]) -> None:
        header = torch.tensor([[layer, n] for n in counts], dtype=torch.long, device=self.device).flatten()  # [2W]
        _all_to_all(torch.empty_like(header), header, [2] * self.world, [2] * self.world)
        self._last = time.monotonic()

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        with self._lock:
            try:
                return self._exchange(layer, hidden, topk_ids, topk_weights)
            except RuntimeError as exc:  # gloo / NCCL: a peer died or the deadline passed
                raise ExchangeFailedError(f"layer {layer}: deepspeed exchange failed: {exc}") from exc

    def _exchange(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
        dev = self.device  # the split runs where the rows are (its row counts are this layer's one sync)
        hidden, topk_ids, topk_weights = hidden.to(dev), topk_ids.to(dev), topk_weights.to(dev)
        shares = split_by_rank(self.placement, layer, topk_ids, topk_weights)
        counts = [0] + [int(s.rows.numel()) for s in shares]  # rows per destination rank
        self._header(layer, counts)
        width = self.hidden_size + 2 * self.top_k
        packed = torch.cat([_pack(hidden[s.rows], s.topk_ids, s.topk_weights) for s in shares]) \
            if sum(counts) else torch.empty(0, width, device=dev)  # [n, H + 2K]
        _all_to_all(torch.empty(0, width, device=dev), packed, [0] * self.world, counts)
        partial = torch.empty(sum(counts), self.hidden_size, device=dev)  # [n, H]
        _all_to_all(partial, torch.empty(0, self.hidden_size, device=dev), counts, [0] * self.world)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)  # [T, H]
        rows = torch.cat([s.rows for s in shares])
        out.index_add_(0, rows, partial)
        self.routed.add(layer, topk_ids)
        return out.to(hidden.dtype)

    def close(self) -> None:
        """Tells every shard to leave its loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._header(STOP, [0] * self.world)
            finally:
                leave_group()
                self._after_close()


def _pack(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # fp32 carries expert ids exactly (ids < 2**24) and bf16 hidden states losslessly.
    return torch.cat([hidden.float(), ids.float(), weights.float()], dim=1)  # [n, H + 2K]


def run_shard(shard: ExpertShard, rank: int, world: int, hidden_size: int, top_k: int,
              device: torch.device | str = "cpu") -> int:
    """The shard's side: serve exchanges until the engine says stop; returns exchanges served.
    `device`: where the exchange buffers live (the shard's GPU with nccl, the CPU with gloo)."""
    served = 0
    width = hidden_size + 2 * top_k
    dev = torch.device(device)
    while True:
        header = torch.empty(world * 2, dtype=torch.long, device=dev)
        _all_to_all(header, torch.zeros(world * 2, dtype=torch.long, device=dev), [2] * world, [2] * world)
        layer, n = int(header[0]), int(header[1])  # what rank 0 sent this rank
        if layer == STOP:
            leave_group()
            return served
        if layer == NOOP:
            continue
        recv_splits = [n] + [0] * (world - 1)
        packed = torch.empty(n, width, device=dev)  # [n, H + 2K]
        _all_to_all(packed, torch.empty(0, width, device=dev), recv_splits, [0] * world)
        hidden, ids, weights = packed.split([hidden_size, top_k, top_k], dim=1)
        partial = shard.compute_moved(layer, hidden.contiguous(), ids.long(), weights.contiguous())  # [n, H] fp32
        _all_to_all(torch.empty(0, hidden_size, device=dev), partial.contiguous(), [0] * world, recv_splits)
        served += 1
