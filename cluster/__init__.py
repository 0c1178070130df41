"""The runtime library: model, engine, expert parallelism and the offline API.

Names resolve lazily, so `import cluster.errors` (or any light module) pulls in neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.engine.engine_config import EngineConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams
    from cluster.llm import LLM, CompletionOutput

_EXPORTS = {
    "LLM": "cluster.llm",
    "CompletionOutput": "cluster.llm",
    "EngineConfig": "cluster.engine.engine_config",
    "LLMEngine": "cluster.engine.llm_engine",
    "SamplingParams": "cluster.engine.sampling_params",
}
__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
