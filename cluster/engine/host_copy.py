"""A step's integer inputs go to the device as one copy: packed into a pinned host buffer (reused
step after step) and sent with one non-blocking copy, then cut back into views on the device. On
the CPU the tensors are used as they are."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HostToDevice:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging = torch.zeros(0, dtype=torch.long)
        self._sent: torch.cuda.Event | None = None  # the last copy out of the staging buffer

    def staging(self, numel: int) -> torch.Tensor:
        """A host buffer of at least `numel` int64 (pinned on CUDA), free to write: the previous
        copy out of it has finished."""
        if self._sent is not None:
            self._sent.synchronize()  # in practice long done: every step reads its tokens back
            self._sent = None
        if self._staging.numel() < numel:
            size = max(numel, 2 * self._staging.numel(), 4096)
            self._staging = torch.zeros(size, dtype=torch.long, pin_memory=self.device.type == "cuda")
        return self._staging[:numel]

    def send(self, host: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`host` (from `staging`) copied to the device without waiting, into `out` if given."""
        if self.device.type == "cpu":
            return host if out is None else out.copy_(host)
        if out is None:
            out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        out.copy_(host, non_blocking=True)
        self._sent = torch.cuda.Event()
        self._sent.record()
        return out

    def to_device(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """int64 host tensors -> the same on the device, in one copy."""
        if self.device.type == "cpu":
            return list(parts)
        sizes = [p.numel() for p in parts]
        host = self.staging(sum(sizes))
        torch.cat([p.reshape(-1) for p in parts], out=host)
        sent = self.send(host)
        return [flat.view(p.shape) for flat, p in zip(sent.split(sizes), parts, strict=True)]
