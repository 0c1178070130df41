"""Ray actor body of one expert shard: its experts, and the shard side of either transport."""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.experts.wire import WireSecret

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ShardWorker:
    def __init__(self, spec: Any, rank: int, secret: WireSecret | None = None) -> None:
        import torch

        from cluster.experts.devices import shard_device, shard_dtype
        from cluster.experts.placement import ExpertPlacement
        from cluster.experts.shard import ExpertShard
        from cluster.experts.transport_ray import Coalescer
        from cluster.model.checkpoint import CheckpointReader
        from cluster.model.config import load_model_config

        torch.set_num_threads(spec.torch_threads)
        config = load_model_config(spec.model_dir)
        self.text = config.text
        placement = ExpertPlacement.of_model(self.text, spec.num_shards)
        self.rank, self.world = rank, spec.num_shards + 1
        device = shard_device(spec.shard_num_gpus)  # its GPU when it asked Ray for one
        self.shard = ExpertShard(CheckpointReader(spec.model_dir, config), placement, rank,
                                 spec.expert_cache_bytes, device, shard_dtype(spec.engine.dtype, device))
        self.coalescer = Coalescer(self.shard, window_s=0.0005 if spec.num_engines > 1 else 0.0)
        self.server: Any = None  # the ray transport's exchange server, started on first use
        self._secret = secret  # the ray transport's: engines prove they hold it before a frame is read
        self._max_rows = spec.engine.max_num_batched_tokens  # an engine step's tokens: the most one frame carries
        self._server_lock = threading.Lock()
        self._loop: threading.Thread | None = None
        self.exchanges = 0

    def ready(self) -> int:
        return self.rank

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    # -- the ray transport -------------------------------------------------------------------

    def exchange_address(self) -> tuple[str, int]:
        """Where this shard's exchange server listens (started on the first call, on this node's
        address only): engines send their rows there (cluster/experts/wire.py)."""
        import ray

        from cluster.experts.wire import ExchangeServer, FrameLimits

        with self._server_lock:  # engines ask concurrently (the actor runs several calls at once)
            if self.server is None:
                if self._secret is None:
                    raise RuntimeError("this shard was started without the group's wire secret")
                limits = FrameLimits(self.text.hidden_size, self.text.num_experts_per_tok, self._max_rows)
                self.server = ExchangeServer(self.coalescer.compute, self._secret, limits,
                                             host=ray.util.get_node_ip_address())
        return self.server.host, self.server.port

    def wire_peers(self) -> tuple[int, int]:
        """(accepted, refused) connections of the exchange server: refused ones failed the
        handshake, timed out in it, or sent a frame that does not parse or exceeds the limits."""
        return (self.server.accepted, self.server.refused) if self.server is not None else (0, 0)

    def coalesced(self) -> tuple[int, int]:
        """(calls, batches): fewer batches than calls means calls from engines were merged."""
        return self.coalescer.calls, self.coalescer.batches

    # -- the deepspeed transport -------------------------------------------------------------

    def join_deepspeed(self, address: Any, deadline_s: float) -> None:
        """(Re-)joins the group as rank + 1 and serves exchanges in a thread until told to stop
        or until the group breaks (then the engine re-forms it and calls this again)."""
        from cluster.experts.devices import backend_device
        from cluster.experts.transport_deepspeed import init_group, leave_group

        if self._loop is not None:
            self._loop.join(timeout=2 * deadline_s)
            if self._loop.is_alive():
                raise RuntimeError(f"shard {self.rank}: previous exchange loop did not stop")
        leave_group()
        init_group(address, self.rank + 1, deadline_s)
        device = backend_device(address.backend)
        self._loop = threading.Thread(target=self._serve, args=(device,), name="exchange-loop", daemon=True)
        self._loop.start()

    def _serve(self, device: Any) -> None:
        from cluster.experts.transport_deepspeed import run_shard

        try:
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(torch.cuda.current_device())  # this thread's NCCL calls, on the group's GPU
            self.exchanges += run_shard(self.shard, self.rank + 1, self.world, self.text.hidden_size,
                                        self.text.num_experts_per_tok, device)
        except Exception as exc:  # noqa: BLE001 - a broken group ends the loop; the engine re-forms it
            log.warning("shard %d: exchange loop ended: %s", self.rank, exc)

    # -- inspection --------------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        return self.shard.held()

    def resident_bytes(self) -> int:
        return self.shard.resident_bytes()

    def reads(self) -> list[str]:
        return self.shard.reads

    def token_counts(self) -> dict[int, Any]:
        return self.shard.token_counts()
