"""The offline API, in the style of vLLM: `LLM(model_dir).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm.auto import tqdm

from cluster.engine.engine_config import EngineConfig, MaxModelLen
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.output_aggregator import OutputKind, RequestOutput
from cluster.engine.run_requests import EngineRequest, run_requests
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import TokenLogprobs
from cluster.engine.stop import StopChecker
from cluster.errors import ConfigError, RequestError
from cluster.model.config import load_model_config
from cluster.model.image_rows import ImageRows, pixel_hash
from cluster.model.preflight import check_model_dir
from cluster.model.vision import ImageInput, ImageLimits, InvalidImageError, VisionEncoder, image_rows
from cluster.model.weight_source import open_weights

if TYPE_CHECKING:
    from cluster.experts.group import ExpertGroup
    from cluster.model.tokenizer import Tokenizer

Prompt = str | Sequence[int] | dict[str, Any]
_IDS_KEYS = {"prompt_token_ids", "images", "cache_salt"}
_CHAT_KEYS = {"messages", "tools", "reasoning_effort", "cache_salt"}


@dataclass(frozen=True)
class CompletionOutput:
    """A prompt's finished output. `outputs` holds its `SamplingParams.n` choices in index order,
    as vLLM's `RequestOutput.outputs`; the fields here are choice 0's, so `outs[i].text` is the
    same for any n. (The choices in `outputs` have no `outputs` of their own.)"""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: tuple[TokenLogprobs, ...] | None
    index: int = 0
    outputs: tuple[CompletionOutput, ...] = ()


class LLM:
    def __init__(self, model: str | Path | None = None, *, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_model_len: MaxModelLen = "auto",
                 target_step_ms: float | None = None, min_prefill_tokens: int = 32, transport: str = "local",
                 num_expert_shards: int = 0, num_engines: int = 1, exchange_deadline_s: float = 30.0,
                 image_limits: ImageLimits | None = None, num_routers: int | None = None,
                 expert_cache_bytes: int = 0, enable_prefix_caching: bool = True, device: str | None = None,
                 dtype: str | None = None, load_format: str = "auto", attention_backend: str | None = None,
                 enforce_eager: bool = False, shard_num_gpus: float = 0.0, engine_num_gpus: float = 0.0) -> None:
        """`transport="local"` runs everything here (with `num_expert_shards` > 1, experts are split
        over in-process shards by placement). A distributed transport ("deepspeed", "ray") starts or
        joins a Ray cluster and runs `num_engines` engines (attention; more than one only with "ray")
        and `num_expert_shards` shards in their own actors. `num_routers` is the deprecated name of
        `num_engines`. The engine settings (`kv_cache_bytes`, `max_model_len`, `target_step_ms`, ...)
        are `EngineConfig`'s. `expert_cache_bytes` caps, per expert shard (over its layers), the cache of dequantized
        experts of an FP8 checkpoint (0: each routed expert is dequantized when used).

        `device` ("cpu", "cuda", "cuda:1"; None: CUDA where visible, else the CPU) and `dtype`
        ("float32", "bfloat16", "float16"; None: bfloat16 on CUDA, float32 elsewhere) place the weights,
        the KV pool, the step and, under `transport="local"`, the routed experts (FP8 experts stay
        fp8). `load_format="dummy"` builds random weights on the device from config.json alone (no
        weight file, no tokenizer needed: prompts as token ids). `attention_backend` ("torch",
        "triton"; None: triton on CUDA where importable); `enforce_eager` turns decode CUDA graphs off.
        With a distributed transport, `shard_num_gpus` and `engine_num_gpus` are the GPUs each shard and
        engine actor asks Ray for (shards with GPUs keep their experts there)."""
        if num_routers is not None:
            import warnings

            warnings.warn("LLM(num_routers=...) is deprecated: use num_engines", DeprecationWarning, stacklevel=2)
            num_engines = num_routers
        if model is None:
            from cluster.testing.embedded import embedded_checkpoint

            model = embedded_checkpoint()
        config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_bytes=kv_cache_bytes,
                              gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                              target_step_ms=target_step_ms, min_prefill_tokens=min_prefill_tokens,
                              enable_prefix_caching=enable_prefix_caching, device=device, dtype=dtype,
                              load_format=load_format, attention_backend=attention_backend,
                              enforce_eager=enforce_eager)
        self.model_dir = Path(model)
        if load_format == "dummy":  # config.json alone
            if transport != "local":
                raise ConfigError(f"load_format 'dummy' runs under transport 'local', not {transport!r}")
            self.model_config = load_model_config(self.model_dir)
        else:  # checks before start: config, tensor headers and tokenizer, before a weight byte is read
            self.model_config = check_model_dir(self.model_dir).config
        self.engine: LLMEngine | None = None
        self.group: ExpertGroup | None = None
        if transport == "local":
            from cluster.experts.dispatchers import load_local_dispatcher

            weights = open_weights(model, self.model_config, load_format, config.resolved_device(), config.torch_dtype)
            dispatcher = load_local_dispatcher(weights, max(num_expert_shards, 1), expert_cache_bytes,
                                               config.resolved_device(), config.torch_dtype)
            self.engine = LLMEngine(model, config, dispatcher)
            self.tokenizer = self.engine.stop.tokenizer
        else:
            from cluster.experts.group import ExpertGroup, GroupSpec

            if num_expert_shards < 1:
                raise ConfigError(f"transport {transport!r} needs num_expert_shards >= 1")
            self.group = ExpertGroup(GroupSpec(str(model), num_expert_shards, transport, config,
                                               num_engines=num_engines, exchange_deadline_s=exchange_deadline_s,
                                               expert_cache_bytes=expert_cache_bytes, shard_num_gpus=shard_num_gpus,
                                               engine_num_gpus=engine_num_gpus))
            self.tokenizer = StopChecker.for_model_dir(self.model_dir, ()).tokenizer
        self._ids = itertools.count()
        self.image_limits = image_limits or ImageLimits()
        self._vision: VisionEncoder | None = None

    @property
    def vision(self) -> VisionEncoder:
        """The in-process vision encoder, built on first use."""
        if self._vision is None:
            self._vision = VisionEncoder.from_model_dir(self.model_dir)
        return self._vision

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text (with BOS), token ids as given, {"prompt_token_ids": [...]}
        or a chat request {"messages": [...], "tools": ..., "reasoning_effort": ...}."""
        return self._encode(prompt)[0]

    def _encode(self, prompt: Prompt) -> tuple[list[int], list[ImageInput]]:
        if isinstance(prompt, str):
            return self._tokenizer("text").encode_text(prompt), []
        if isinstance(prompt, dict):
            kind, allowed = ("messages", _CHAT_KEYS) if "messages" in prompt else ("prompt_token_ids", _IDS_KEYS)
            if kind not in prompt or set(prompt) - allowed:
                raise RequestError(f"a dict prompt is {{'prompt_token_ids', 'images', 'cache_salt'}} or {{'messages', "
                                   f"'tools', 'reasoning_effort', 'cache_salt'}}; got keys {sorted(prompt)}")
            if kind == "messages":
                chat = self._tokenizer("chat").encode_chat(prompt["messages"], prompt.get("tools"),
                                                           prompt.get("reasoning_effort"))
                return chat.token_ids, list(chat.images)
            images = prompt.get("images") or []
            if not isinstance(images, list | tuple):
                raise RequestError(f"'images' must be a list of [C, H, W] arrays, got {type(images).__name__}")
            return list(prompt["prompt_token_ids"]), list(images)
        return list(prompt), []

    def _validate(self, tokens: list[int]) -> None:
        if self.engine is not None:
            self.engine.validate_prompt(tokens)
            return
        assert self.group is not None  # one or the other, from __init__
        self.group.validate(tokens)

    def close(self) -> None:
        """Stops the expert group's actors (a local engine holds nothing to release)."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def _tokenizer(self, kind: str) -> Tokenizer:
        if self.tokenizer is None:
            raise RequestError(f"{kind} prompts need a tokenizer; this model directory has none")
        return self.tokenizer

    def _embed_images(self, encoded: list[tuple[list[int], list[ImageInput]]]) -> list[ImageRows | None]:
        """Image rows of each prompt with images (None for the others); every image of every
        prompt goes through one encoder call."""
        with_images = [(ids, imgs) for ids, imgs in encoded if imgs]
        if not with_images:
            return [None] * len(encoded)
        if self.model_config.vision is None:
            raise InvalidImageError(f"{self.model_dir} has no vision tower; this model takes no images")
        for _, imgs in with_images:
            self.image_limits.check(imgs)
            self.vision.check(imgs)
        flat = self.vision.encode([im for _, imgs in with_images for im in imgs])
        img_end = self.tokenizer.img_end_id if self.tokenizer else None
        out: list[ImageRows | None] = []
        for ids, imgs in encoded:
            if not imgs:
                out.append(None)
                continue
            mine, flat = flat[:len(imgs)], flat[len(imgs):]
            out.append(image_rows(ids, mine, self.model_config.image_token_id, img_end,
                                  [pixel_hash(im) for im in imgs]))
        return out

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[CompletionOutput]:
        """The finished output of every prompt, in prompt order; with `SamplingParams.n` > 1 its
        choices are in `outputs` (see `CompletionOutput`)."""
        requests = self._requests(prompts, sampling_params)
        done: dict[tuple[str, int], RequestOutput] = {}
        total = sum(r.params.n for r in requests)
        with tqdm(total=total, desc="generate", disable=not use_tqdm, unit="seq") as bar:
            for out in self._run(requests, OutputKind.FINAL_ONLY):
                done[(out.request_id, out.index)] = out
                bar.update(1)
        return [_completion([done[(r.request_id, i)] for i in range(r.params.n)]) for r in requests]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               output_kind: OutputKind = OutputKind.CUMULATIVE) -> Iterator[RequestOutput]:
        """The outputs of every prompt as the engine makes them, of `output_kind` (everything so
        far after each step, only what is new, or one at the end), the prompts' outputs
        interleaved (`request_id`, `offline-N`, tells them apart). Leaving the iterator early
        aborts what still runs. With an expert group (a distributed transport) each request gives
        one output, when it finished."""
        return self._run(self._requests(prompts, sampling_params), output_kind)

    def _run(self, requests: list[EngineRequest], kind: OutputKind) -> Iterator[RequestOutput]:
        if self.engine is not None:
            return run_requests(self.engine, requests, kind)
        assert self.group is not None  # one or the other, from __init__
        # The group's engines take one choice per request: the choices of n > 1 go as requests
        # of their own, seeded as the engine seeds choices, and come back under their index.
        split = [(r, i) for r in requests for i in range(r.params.n)]
        singles = [r if r.params.n == 1 else EngineRequest(f"{r.request_id}/{i}", r.prompt_token_ids,
                                                           r.params.for_choice(i), r.images, r.cache_salt)
                   for r, i in split]
        outs = self.group.generate(singles)
        return iter(dataclasses.replace(o, request_id=r.request_id, index=i)
                    for o, (r, i) in zip(outs, split, strict=True))

    def _requests(self, prompts: Prompt | Sequence[Prompt],
                  sampling_params: SamplingParams | Sequence[SamplingParams] | None) -> list[EngineRequest]:
        """Every prompt encoded and validated (and its images embedded) before any is admitted."""
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise RequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        for tokens, _ in encoded:
            self._validate(tokens)
        embeds = self._embed_images(encoded)
        salts = [_cache_salt(p) for p in prompts]
        return [EngineRequest(f"offline-{next(self._ids)}", tokens, p, emb, salt)
                for (tokens, _), emb, p, salt in zip(encoded, embeds, params, salts, strict=True)]


def _cache_salt(prompt: Prompt) -> str | None:
    """A dict prompt's `cache_salt` (as vLLM's prompt dicts carry it): prompts share cached KV
    blocks only with prompts of the same salt."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise RequestError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, a dict, token ids) or a sequence of prompts, as a list of prompts."""
    if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
        return [cast(Prompt, prompts)]  # a sequence of ints is one prompt's token ids
    return list(cast(Sequence[Prompt], prompts))


def _completion(choices: list[RequestOutput]) -> CompletionOutput:
    """A prompt's output from its choices' final outputs, in index order."""
    outputs = tuple(CompletionOutput(c.request_id, c.prompt_token_ids or (), c.token_ids, c.text, c.finish_reason,
                                     c.stop_reason, c.logprobs, c.index) for c in choices)
    return dataclasses.replace(outputs[0], outputs=outputs)
