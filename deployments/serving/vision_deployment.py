"""The VisionEncoder deployment: the Pixtral tower and projector (cluster.model.vision.VisionEncoder) in
their own replicas, so neither the ingress nor the engine servers carry them. Images of concurrent
requests are batched with `@serve.batch` into one tower call; each request gets back its images'
embeddings [N_i, H] in order (on the CPU, in the tower's dtype: fp32 on CPUs, bf16 on GPUs).

The ingress sends preprocessed images (mistral-common: resized by the Pixtral rules, normalized,
[C, H, W] float32) and turns the embeddings into ImageRows for the engine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from cluster.errors import RequestError
from cluster.model.config import load_model_config
from deployments.config import AppConfig, resolve_model_dir
from deployments.errors import BadRequest, request_error
from deployments.telemetry.recorders import VisionMetrics

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "VisionEncoder"
BATCH_HISTORY = 256  # recent batches kept for stats()


class VisionEncoderDeployment:
    def __init__(self, config: AppConfig) -> None:
        import torch

        from cluster.model.vision import ImageLimits, VisionEncoder

        model_dir = resolve_model_dir(config.model)
        model_config = load_model_config(model_dir)
        self.has_vision = model_config.vision is not None
        self.image_token_id = model_config.image_token_id
        self.encoder: VisionEncoder | None = None
        self.device = "cpu"
        if self.has_vision:
            self.encoder = VisionEncoder.from_model_dir(model_dir)
            if torch.cuda.is_available():  # Ray exposes only the GPUs given to this replica
                self.device = "cuda"
                # bf16 on GPUs (fp32 on CPUs is what parity is checked in)
                self.encoder.tower.to(self.device, torch.bfloat16)
                self.encoder.projector.to(self.device, torch.bfloat16)
        # Processed images are at most max_image_size per side (the tokenizer's resize); this guards
        # the tower against anything else reaching it.
        self.limits = ImageLimits(max_images_per_request=config.images.max_images_per_request)
        batching = self._encode_batch  # serve.batch's setters (documented) are missing from ray's types
        batching.set_max_batch_size(config.vision.max_batch_size)  # type: ignore[attr-defined]  # as above
        batching.set_batch_wait_timeout_s(config.vision.batch_wait_s)  # type: ignore[attr-defined]  # as above
        self._lock = threading.Lock()  # the counters: written in the batch task, read by stats()
        self._batches = 0
        self._requests = 0
        self._images = 0
        self._seconds = 0.0
        self._recent: deque[dict[str, Any]] = deque(maxlen=BATCH_HISTORY)
        self._metrics = VisionMetrics()
        logger.info("vision encoder ready: %s (%s, vision tower: %s)", model_dir, self.device, self.has_vision)

    async def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Embeddings [N_i, H] of one request's images, in order. The images are checked here, per
        request, so that one bad request never fails the batch it would have joined."""
        if not self.has_vision or self.encoder is None:
            raise BadRequest("this model has no vision tower; it takes no images", "messages")
        images = list(images)
        if not images:
            return []
        try:
            self.limits.check(images)
            self.encoder.check(images)
        except RequestError as exc:
            raise request_error(exc, "messages") from None
        return await self._encode_batch(images)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, requests: list[list[np.ndarray]]) -> list[list[Any]]:
        flat = [im for images in requests for im in images]
        started = time.perf_counter()
        embeds = await asyncio.to_thread(self._run_tower, flat)
        seconds = time.perf_counter() - started
        out, at = [], 0
        for images in requests:
            out.append(embeds[at:at + len(images)])
            at += len(images)
        with self._lock:
            self._batches += 1
            self._requests += len(requests)
            self._images += len(flat)
            self._seconds += seconds
            self._recent.append({"requests": len(requests), "images": len(flat), "seconds": seconds})
        try:
            self._metrics.observe_encoder(seconds)
        except Exception:  # noqa: BLE001 - metrics never fail a batch
            logger.debug("vision metrics failed", exc_info=True)
        return out

    def _run_tower(self, images: list[np.ndarray]) -> list[Any]:
        import torch

        assert self.encoder is not None
        # The host images go as they are: the encoder builds the padded batch on its device (the GPU).
        tensors = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
        embeds = self.encoder.encode(tensors)  # every image of the batch in one tower call
        return [e.detach().to("cpu").contiguous() for e in embeds]

    def stats(self) -> dict[str, Any]:
        """Batches run so far: how many, with how many requests and images; the recent ones."""
        with self._lock:
            return {"batches": self._batches, "requests": self._requests, "images": self._images,
                    "tower_calls": self.encoder.calls if self.encoder is not None else 0,
                    "seconds": self._seconds, "recent": list(self._recent), "device": self.device,
                    "has_vision": self.has_vision}

    def info(self) -> dict[str, Any]:
        return {"has_vision": self.has_vision, "image_token_id": self.image_token_id, "device": self.device}


class VisionClient:
    """The ingress side: one request's processed images to embeddings through the deployment."""

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    @property
    def available(self) -> bool:
        """False in an application without a VisionEncoder deployment (`vision.num_replicas: 0`)."""
        return self._handle is not None

    async def encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        from deployments.errors import to_api_error

        if self._handle is None:
            raise BadRequest("this application has no vision encoder; it takes no images", "messages")
        response = self._handle.encode.remote(list(images))
        try:
            return await asyncio.wait_for(response, self._timeout_s)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped: 4xx stay 4xx, the rest 503 / 500
            response.cancel()
            raise to_api_error(exc) from None


def vision_deployment(config: AppConfig) -> Any:
    """The bound VisionEncoder deployment of an application, or None (`vision.num_replicas: 0`)."""
    v = config.vision
    if v.num_replicas == 0:
        return None
    ingress_replicas = config.autoscaling.ingress.max_replicas if config.autoscaling else config.num_ingress_replicas
    return serve.deployment(name=DEPLOYMENT_NAME)(VisionEncoderDeployment).options(
        num_replicas=v.num_replicas,
        # queued calls wait in the replica's batch queue rather than at the handle
        max_ongoing_requests=max(4 * v.max_batch_size, ingress_replicas * config.max_ongoing_requests),
        ray_actor_options={"num_cpus": v.num_cpus, "num_gpus": v.num_gpus},
        graceful_shutdown_timeout_s=10,
    ).bind(config)
