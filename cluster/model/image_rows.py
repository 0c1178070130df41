"""Image embeddings as they travel with a request: the rows of the prompt they replace."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageRows:
    """A prompt's image embeddings and the prompt positions they replace (the [IMG] tokens)."""

    positions: torch.Tensor  # [N] sorted prompt positions
    embeds: torch.Tensor  # [N, H]
