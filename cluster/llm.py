"""The offline API, in the style of vLLM: `LLM(model_dir).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cluster.engine import LLMEngine
from cluster.engine_config import EngineConfig
from cluster.errors import RequestError
from cluster.sampling_params import SamplingParams
from cluster.sequence import RequestOutput, TokenLogprobs

Prompt = str | Sequence[int] | dict[str, Any]


@dataclass(frozen=True)
class CompletionOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: tuple[TokenLogprobs, ...] | None


class LLM:
    def __init__(self, model: str | Path | None = None, *, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_bytes: int = 256 * 2**20, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, transport: str = "local") -> None:
        if model is None:
            from cluster.embedded import embedded_checkpoint

            model = embedded_checkpoint()
        config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_bytes=kv_cache_bytes,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_model_len)
        self.engine = LLMEngine(model, config, transport=transport)
        self.tokenizer = self.engine.stop.tokenizer
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text (with BOS), token ids as given, or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer; this model directory has none")
            return self.tokenizer.encode_text(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise RequestError(f"a dict prompt needs 'prompt_token_ids'; got keys {sorted(prompt)}")
            return list(prompt["prompt_token_ids"])
        return list(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[CompletionOutput]:
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise RequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]  # all validated before any is admitted
        for ids in encoded:
            self.engine.validate_prompt(ids)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, tokens, p in zip(ids, encoded, params, strict=True):
            self.engine.add_request(rid, tokens, p)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [_completion(done[rid]) for rid in ids]


def _completion(out: RequestOutput) -> CompletionOutput:
    return CompletionOutput(out.request_id, out.prompt_token_ids, out.token_ids, out.text, out.finish_reason,
                            out.stop_reason, out.logprobs)
