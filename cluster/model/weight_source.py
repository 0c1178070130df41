"""Where a model's weights come from: a checkpoint on disk (`CheckpointReader`) or random weights
built from config.json alone (`DummyWeights`, `load_format="dummy"`). The engine and the expert
shards read through this interface and never ask which."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from cluster.model.config import ModelConfig
from cluster.model.fp8 import ExpertMatrices


class WeightSource(Protocol):
    model_dir: Path
    config: ModelConfig
    compute_dtype: torch.dtype  # the unquantized weights' dtype
    reads: list[str]  # every tensor (and slice) taken from disk

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every text weight except the routed experts, in the compute dtype."""
        ...

    def read_experts(self, layer: int, expert_ids: Sequence[int]) -> tuple[ExpertMatrices, ExpertMatrices]:
        """gate_up [E, 2I, H] and down [E, H, I] of `expert_ids` of `layer` (fp8 ones as `Fp8Experts`)."""
        ...


LOAD_FORMATS = ("auto", "dummy")


def open_weights(model_dir: str | Path, config: ModelConfig, load_format: str = "auto",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> WeightSource:
    """The checkpoint's weights ("auto"), or random ones ("dummy") made on `device` in `dtype`."""
    if load_format == "dummy":
        from cluster.model.dummy_weights import DummyWeights

        return DummyWeights(model_dir, config, device or torch.device("cpu"), dtype or torch.float32)
    from cluster.model.checkpoint import CheckpointReader

    return CheckpointReader(model_dir, config)
