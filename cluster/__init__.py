"""The runtime library: config, checkpoints, model, KV cache, scheduler, engine, offline API."""

from cluster.engine import LLMEngine
from cluster.engine_config import EngineConfig
from cluster.llm import LLM, CompletionOutput
from cluster.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "SamplingParams"]
