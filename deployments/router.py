"""The Router deployment: one attention engine (AsyncEngine over LLMEngine) per replica, fed with
typed requests through a streaming DeploymentHandle. The expert dispatcher is the configured
transport (`local` until the expert-shard deployments exist)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from cluster.async_engine import AsyncEngine, EngineDeadError
from cluster.engine import LLMEngine
from cluster.errors import RequestError
from cluster.sequence import ImageRows, RequestOutput
from cluster.stats import EngineStats
from deployments.api_errors import Unavailable, request_error
from deployments.config import AppConfig, resolve_model_dir, served_name
from deployments.request import GenerateRequest, ModelInfo

logger = logging.getLogger("ray.serve")


class Router:
    def __init__(self, config: AppConfig) -> None:
        model_dir = resolve_model_dir(config.model)
        engine = LLMEngine(model_dir, config.engine.to_engine_config(), transport=config.transport)
        self.engine = AsyncEngine(engine)
        self._vision = None
        mc = engine.model_config
        self._info = ModelInfo(name=served_name(config, model_dir), model_dir=str(model_dir),
                               vocab_size=engine.text.vocab_size, max_model_len=engine.max_model_len,
                               has_vision=mc.vision is not None)
        logger.info("router ready: %s (%s), max_model_len %d, %d KV blocks", self._info.name, model_dir,
                    engine.max_model_len, engine.blocks.num_blocks)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; cancelling the caller's stream aborts it here and frees
        its KV blocks (AsyncEngine.generate aborts when left early)."""
        try:
            images = await self._image_rows(request) if request.images else None
            async for out in self.engine.generate(request.request_id, list(request.prompt_token_ids),
                                                  request.params, images):
                yield out
        except RequestError as exc:
            raise request_error(exc) from None
        except EngineDeadError as exc:
            raise Unavailable(str(exc)) from None

    async def _image_rows(self, request: GenerateRequest) -> ImageRows:
        from cluster.vision import ImageLimits, VisionEncoder, image_rows

        engine = self.engine.engine
        if not self._info.has_vision:
            raise RequestError(f"{self._info.name} has no vision tower; it takes no images")
        if self._vision is None:
            self._vision = VisionEncoder.from_model_dir(engine.model_dir)
        vision, images = self._vision, list(request.images)
        ImageLimits().check(images)
        vision.check(images)
        embeds = await asyncio.to_thread(vision.encode, images)
        tokenizer = engine.stop.tokenizer
        return image_rows(request.prompt_token_ids, embeds, engine.model_config.image_token_id,
                          tokenizer.img_end_id if tokenizer else None)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def info(self) -> ModelInfo:
        return self._info

    def check_health(self) -> None:
        """Serve's health probe: a dead engine loop marks the replica unhealthy (and restarted)."""
        if self.engine._error is not None or not self.engine._thread.is_alive():
            raise RuntimeError(f"engine loop stopped: {self.engine._error!r}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
