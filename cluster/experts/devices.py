"""Where an expert group's tensors live: the shards' device and dtype, the deepspeed transport's
backend (NCCL on GPUs, gloo on CPUs, never mixed), and the pinned host staging through which a GPU
engine or shard moves the `ray` transport's rows to and from its socket.

Ray gives an actor that asks for GPUs (`num_gpus`) only those GPUs (CUDA_VISIBLE_DEVICES), so a
member's GPU is always `cuda` (its first visible one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.errors import ConfigError


def shard_device(num_gpus: float, cuda_available: bool | None = None) -> torch.device:
    """A shard asked for GPUs computes on its GPU; one that did not, on the CPU."""
    if num_gpus <= 0:
        return torch.device("cpu")
    visible = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not visible:
        raise ConfigError(f"an expert shard asked for {num_gpus:g} GPU(s) but torch sees no CUDA device "
                          f"(torch {torch.__version__}: install a CUDA build, or set shard_num_gpus 0)")
    return torch.device("cuda")


def shard_dtype(engine_dtype: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype a shard keeps its unquantized experts in and computes in: the engine's when set,
    else bfloat16 on a GPU, else None (the checkpoint's own). FP8 experts stay FP8 either way."""
    from cluster.engine.engine_config import DTYPES

    if engine_dtype is not None:
        return DTYPES[engine_dtype]
    return torch.bfloat16 if device.type == "cuda" else None


def exchange_backend(engine_device: torch.device, shard_device: torch.device) -> str:
    """The deepspeed group's backend: NCCL when the engine and its shards hold CUDA tensors, gloo
    when they all hold CPU tensors. NCCL takes no CPU tensors and gloo's GPU support is partial, so
    a group that mixes the two is refused."""
    on_gpu = {engine_device.type == "cuda", shard_device.type == "cuda"}
    if on_gpu == {True}:
        return "nccl"
    if on_gpu == {False}:
        return "gloo"
    raise ConfigError(f"transport deepspeed: the engine computes on {engine_device} and its expert shards on "
                      f"{shard_device}; both on GPUs (NCCL; engine_num_gpus and shard_num_gpus > 0) or both on "
                      "CPUs (gloo)")


def backend_device(backend: str) -> torch.device:
    """Where a member's exchange buffers live for `backend`."""
    return torch.device("cuda") if backend == "nccl" else torch.device("cpu")


@dataclass
class PinnedStaging:
    """A reusable page-locked host buffer for one direction of one connection: a CUDA tensor is
    copied into it (one DMA, no pageable bounce) before its bytes go to the socket, and bytes from
    the socket land in it before one copy to the GPU. A later use waits for the copy that last read
    it. On a CPU-only host (no CUDA) it is plain memory and `to_host` returns its input."""

    buffer: torch.Tensor | None = None
    _pending: torch.cuda.Event | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of `nbytes` (a view of the buffer, grown when needed)."""
        if self._pending is not None:  # the GPU may still be reading the last contents
            self._pending.synchronize()
            self._pending = None
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self.buffer[:nbytes]

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the host: a CPU tensor as it is; a CUDA tensor through the pinned buffer
        (synchronous: the socket reads the bytes right after)."""
        if t.device.type == "cpu":
            return t
        t = t.contiguous()
        host = self.take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` (a view of this buffer, or any CPU tensor) on `device`; the buffer is not reused
        before that copy has read it."""
        if device.type == "cpu":
            return host.clone() if self.buffer is not None and _shares(host, self.buffer) else host
        out = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._pending = event
        return out


def _shares(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= t.data_ptr() < start + buffer.numel()
