"""The typed request that travels from the ingress to a router, and what a router says about its
model. Frozen dataclasses: pickled across Ray hops, never validated twice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    images: tuple[np.ndarray, ...] = ()  # preprocessed [C, H, W] images, in prompt order


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_dir: str
    vocab_size: int
    max_model_len: int
    has_vision: bool
