"""What the HTTP and gRPC front ends share inside an ingress replica: the tokenizer, the engine
client, admission, readiness, and the checks that turn a client's prompt and limits into typed
engine requests (every refusal a 4xx naming the field)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from cluster.engine.grammar import Grammar
from cluster.engine.response_grammar import ResponseGrammars
from cluster.engine.sampling_params import SamplingParams
from cluster.errors import InvalidGrammarError, RequestError
from cluster.model.config import load_model_config
from cluster.model.image_rows import ImageRows
from cluster.model.tokenizer import EncodedChat, InvalidChatRequestError, Tokenizer
from deployments.config import AppConfig, resolve_model_dir
from deployments.errors import BadRequest, NotFound, Unavailable, request_error
from deployments.frontend.admission import Admission, TokenBudget
from deployments.frontend.engine_client import EngineClient, EngineStream, new_request_id
from deployments.frontend.images import ImagePipeline
from deployments.serving.request import GenerateRequest, ModelInfo
from deployments.serving.vision_deployment import VisionClient
from deployments.telemetry.recorders import VisionMetrics

logger = logging.getLogger("ray.serve")

INFO_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 2.0


class IngressCore:
    def __init__(self, engine: object, config: AppConfig, vision: object | None = None) -> None:
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        self.tokenizer = Tokenizer.from_model_dir(self.model_dir)
        self.engine = EngineClient(engine, self.tokenizer, config.retry_after_s)
        self.admission = Admission(config.max_ongoing_requests, config.retry_after_s)
        self.prompt_budget = TokenBudget(config.prompt_token_budget, config.retry_after_s)
        self.images = ImagePipeline(config.images, VisionMetrics())
        self.vision = VisionClient(vision, config.vision.timeout_s)
        self.image_token_id = load_model_config(self.model_dir).image_token_id
        self.grammars = ResponseGrammars(self.tokenizer)
        self._info: ModelInfo | None = None

    # -- readiness ---------------------------------------------------------------------------

    async def ready(self) -> bool:
        """True once an engine server has loaded the model and its engine loop runs. It asks for
        the stats the engine loop publishes (`EngineServer.stats`), which never wait for a step, so
        a long prefill does not make a busy replica look unready. False while draining."""
        if self.admission.draining:
            return False
        try:
            if self._info is None:
                self._info = await self.engine.info(READY_TIMEOUT_S)
            await self.engine.stats(READY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False
        return True

    async def info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self.engine.info(INFO_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - loading, restarting or gone: all 503
                raise Unavailable("the model is not loaded yet; retry later",
                                  retry_after_s=self.config.retry_after_s) from exc
        return self._info

    async def check_model(self, name: str | None) -> ModelInfo:
        info = await self.info()
        if name not in (None, "", info.name):
            raise NotFound(f"model {name!r} does not exist; this server serves {info.name!r}", "model")
        return info

    # -- prompts -----------------------------------------------------------------------------

    def encode_completion_prompts(self, prompt: str | list, info: ModelInfo) -> list[list[int]]:
        """A text, token ids, or a list of either, as token-id prompts (text gets BOS)."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = list(prompt)
        else:
            raise BadRequest("prompt is empty", "prompt")
        if len(prompts) > self.config.max_n:
            raise BadRequest(f"{len(prompts)} prompts in one request; the limit is {self.config.max_n}", "prompt")
        out = []
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str) and not p:
                raise BadRequest(f"{param} is empty", param)
            ids = self.tokenizer.encode_text(p) if isinstance(p, str) else list(p)
            self.check_prompt(ids, info, param)
            out.append(ids)
        return out

    def encode_chat(self, messages: list, tools: list | None, reasoning_effort: str | None) -> EncodedChat:
        try:
            return self.tokenizer.encode_chat(messages, tools, reasoning_effort)
        except InvalidChatRequestError as exc:
            raise BadRequest(str(exc), exc.field) from None
        except RequestError as exc:
            raise request_error(exc, "messages") from None

    @staticmethod
    def check_prompt(ids: Sequence[int], info: ModelInfo, param: str) -> None:
        if not ids:
            raise BadRequest(f"{param} is empty", param)
        for i, tok in enumerate(ids):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < info.vocab_size:
                raise BadRequest(f"{param} token {i} is {tok!r}, outside the vocabulary [0, {info.vocab_size})",
                                 param)
        if len(ids) >= info.max_model_len:
            raise BadRequest(f"{param} has {len(ids)} tokens; the context limit is {info.max_model_len} "
                             "(prompt plus at least one generated token)", param)

    def max_tokens(self, requested: int | None, prompt_lens: Sequence[int], info: ModelInfo, default: int) -> int:
        room = info.max_model_len - max(prompt_lens)
        if requested is None:
            return max(1, min(default, room))
        if requested > self.config.max_tokens:
            raise BadRequest(f"max_tokens is {requested}; the server allows at most {self.config.max_tokens}",
                             "max_tokens")
        if requested > room:
            raise BadRequest(f"max_tokens is {requested} but the prompt ({max(prompt_lens)} tokens) leaves room "
                             f"for {room} in the context of {info.max_model_len}", "max_tokens")
        return requested

    # -- generation --------------------------------------------------------------------------

    @staticmethod
    def sampling_params(body: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = body.stop if body.stop is not None else ()
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                min_p=body.min_p or 0.0, stop=(stop,) if isinstance(stop, str) else tuple(stop),
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
                include_stop_str_in_output=body.include_stop_str_in_output, min_tokens=body.min_tokens,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()))
        except RequestError as exc:
            raise request_error(exc) from None

    async def grammar(self, build: Callable[[ResponseGrammars], Grammar | None]) -> Grammar | None:
        """The grammar a request's answer must match (structured output), made and checked off the
        event loop (the first one builds the grammar factory: seconds); a refusal is a 400 naming
        the part of the request."""
        try:
            return await asyncio.to_thread(build, self.grammars)
        except InvalidGrammarError as exc:
            raise BadRequest(str(exc), exc.field) from None

    def check_n(self, n: int, prompts: int) -> None:
        if n * prompts > self.config.max_n:
            raise BadRequest(f"n x prompts is {n * prompts}; the limit is {self.config.max_n}", "n")

    async def embed_images(self, token_ids: Sequence[int], images: Sequence[Any]) -> ImageRows | None:
        """The prompt's image embeddings (from the VisionEncoder deployment, batched with other
        requests' images) placed on its [IMG] tokens; None without images."""
        if not images:
            return None
        from cluster.model.image_rows import pixel_hash
        from cluster.model.vision import image_rows  # torch: imported on the first image

        embeds = await self.vision.encode(images)
        # the processed pixels (resized, normalized): the same picture from any URL keys the same blocks
        hashes = await asyncio.to_thread(lambda: [pixel_hash(im) for im in images])
        try:
            return image_rows(token_ids, embeds, self.image_token_id, self.tokenizer.img_end_id, hashes)
        except RequestError as exc:
            raise request_error(exc, "messages") from None

    async def start(self, prefix: str, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int,
                    images: ImageRows | None = None, param: str = "prompt", cache_salt: str | None = None
                    ) -> tuple[str, list[EngineStream]]:
        """Opens n streams per prompt (choice index = prompt * n + j, as vLLM numbers them), within
        the replica's prompt token budget (each stream gives its tokens back when it ends). Choice j
        of a seeded prompt is seeded as the engine seeds its choice j (`SamplingParams.for_choice`),
        so the choices differ and a repeat gives the same ones."""
        rid = new_request_id(prefix)
        choices = [params.for_choice(j) for j in range(n)]
        requests = [GenerateRequest(f"{rid}-{i * n + j}", tuple(p), choices[j], images, cache_salt)
                    for i, p in enumerate(prompts) for j in range(n)]
        releases = self.prompt_budget.take([len(r.prompt_token_ids) for r in requests], param)
        try:
            return rid, await self.engine.open(requests, releases)
        except BaseException:
            for release in releases:
                release()
            raise
