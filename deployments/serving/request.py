"""The typed request that travels from the ingress to an engine server, and what an engine server
says about its model. Frozen dataclasses: pickled across Ray hops, never validated twice."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.engine.sampling_params import SamplingParams
from cluster.model.image_rows import ImageRows


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    # the prompt's image embeddings and the [IMG] positions they fill, from the VisionEncoder
    # deployment (each choice of a request carries its own copy)
    images: ImageRows | None = None
    cache_salt: str | None = None  # the prefix cache shares blocks only among requests of the same salt


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_dir: str
    vocab_size: int
    max_model_len: int
    has_vision: bool
