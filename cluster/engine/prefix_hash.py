"""Content keys of full KV blocks, for the prefix cache (and the request router's prefix memory).

A full block's key is SHA-256 over (its parent block's key, its token ids, the pixel hash of every
image whose rows fall in it). The chain makes a key name the whole prefix up to the block's end,
so two prompts share a cached block only when everything before it is the same as well. An
optional cache salt goes into the first block's parent key: prompts with different salts (tenants)
never share a block. As vLLM keys its blocks, with SHA-256 rather than Python's `hash`, so a key
cannot be made to collide by choosing a prompt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import torch

from cluster.model.image_rows import ImageRows

NO_SALT = b""


def root_key(cache_salt: str | None) -> bytes:
    """The parent key of a prompt's first block."""
    if not cache_salt:
        return NO_SALT
    return hashlib.sha256(b"cache_salt\x00" + cache_salt.encode()).digest()


def _image_extras(images: ImageRows | None, start: int, end: int) -> bytes:
    """What of the prompt's images lies in positions [start, end): the pixel hash of each image
    whose rows fall there, or (images without keys) the embedding rows themselves."""
    if images is None or images.positions.numel() == 0:
        return b""
    if images.keys:
        return b"".join(k.pixel_hash for k in images.keys if k.start < end and k.end > start)
    lo, hi = (int(i) for i in torch.searchsorted(images.positions, torch.tensor([start, end])))
    if lo == hi:
        return b""
    rows = images.embeds[lo:hi].detach().to("cpu").contiguous()  # [r, H]
    return hashlib.sha256(rows.view(torch.uint8).numpy().tobytes()).digest()


def extend_block_keys(keys: list[bytes], token_ids: Sequence[int], block_size: int,
                      images: ImageRows | None = None, cache_salt: str | None = None,
                      limit: int | None = None) -> list[bytes]:
    """Appends to `keys` the keys of the full blocks of `token_ids` it lacks (up to `limit` blocks in
    all), and returns it: a sequence's keys grow as its blocks fill."""
    full = len(token_ids) // block_size
    if limit is not None:
        full = min(full, limit)
    parent = keys[-1] if keys else root_key(cache_salt)
    for b in range(len(keys), full):
        start, end = b * block_size, (b + 1) * block_size
        h = hashlib.sha256(parent)
        h.update(array("q", token_ids[start:end]).tobytes())
        h.update(_image_extras(images, start, end))
        parent = h.digest()
        keys.append(parent)
    return keys


def block_keys(token_ids: Sequence[int], block_size: int, images: ImageRows | None = None,
               cache_salt: str | None = None) -> list[bytes]:
    """The keys of every full block of `token_ids`, first block first."""
    return extend_block_keys([], token_ids, block_size, images, cache_salt)
