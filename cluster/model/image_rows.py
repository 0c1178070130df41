"""Image embeddings as they travel with a request: the rows of the prompt they replace, and which
image each run of rows came from (its pixel hash: what the prefix cache keys a block by)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


def pixel_hash(pixels: Any) -> bytes:
    """SHA-256 of an image's pixels (shape, dtype and bytes of a numpy array or tensor): two
    requests share cached blocks over an image only when its pixels are the same, whatever URL
    they came from."""
    array = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels
    h = hashlib.sha256()
    h.update(repr((tuple(array.shape), str(array.dtype))).encode())
    h.update(memoryview(array.tobytes()))
    return h.digest()


@dataclass(frozen=True)
class ImageKey:
    """One image of a prompt: the prompt positions its rows fill, [start, end), and its pixel hash."""

    start: int
    end: int
    pixel_hash: bytes


@dataclass(frozen=True)
class ImageRows:
    """A prompt's image embeddings and the prompt positions they replace (the [IMG] tokens)."""

    positions: torch.Tensor  # [N] sorted prompt positions
    embeds: torch.Tensor  # [N, H]
    # One per image, in prompt order; () when the pixels were not at hand (the prefix cache then
    # keys a block by the embedding rows that fall in it).
    keys: tuple[ImageKey, ...] = ()
