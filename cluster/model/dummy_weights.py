"""Random weights from config.json alone (`load_format="dummy"`, as vLLM's): a benchmark at the real
layer sizes needs no checkpoint file. Every tensor is made directly on the target device in the
compute dtype: linear and embedding weights normal with the config's `initializer_range` (as
transformers initialises them, so activations and logits stay finite and of ordinary size), norm
weights one, biases zero. With an FP8 `quantization_config` the routed experts are fp8 with scales
(block grids or one scale per expert, as the checkpoint would hold them) and stay fp8 on the device;
the dense weights come in the compute dtype, as a real FP8 checkpoint's are after loading.

The names and shapes are `tensor_specs.expected_tensors`' (the one place that knows them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cluster.model.config import ModelConfig
from cluster.model.fp8 import FP8, ExpertMatrices, Fp8Experts, ScaleSegment
from cluster.model.tensor_specs import expected_tensors

DEFAULT_INIT = 0.02  # transformers' initializer_range default
SEED = 0
FP8_MAX = 448.0  # e4m3fn's largest finite value


class DummyWeights:
    def __init__(self, model_dir: str | Path, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.device = torch.device(device)
        self.compute_dtype = dtype
        self.reads: list[str] = []  # nothing is ever read from disk
        text = config.text
        self.std = float(getattr(text.hf, "initializer_range", None) or DEFAULT_INIT)
        self._generator = torch.Generator(device=self.device).manual_seed(SEED)
        specs = expected_tensors(config, "fused", "F32", lm_head=not text.tie_word_embeddings)
        self._dense = {s.name: s.shape for s in specs if s.part == "dense"}

    def _normal(self, shape: Sequence[int], std: float) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=self.compute_dtype, device=self.device)
        return out.normal_(0.0, std, generator=self._generator)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, shape in self._dense.items():
            leaf = name.rsplit(".", 2)[-2] if "." in name else name
            if name.endswith(".bias"):
                state[name] = torch.zeros(shape, dtype=self.compute_dtype, device=self.device)
            elif "norm" in leaf:
                state[name] = torch.ones(shape, dtype=self.compute_dtype, device=self.device)
            else:
                state[name] = self._normal(shape, self.std)
        return state

    def read_experts(self, layer: int, expert_ids: Sequence[int]) -> tuple[ExpertMatrices, ExpertMatrices]:
        """Random experts `expert_ids` of `layer`: gate_up [E, 2I, H] and down [E, H, I]."""
        text = self.config.text
        e, h, inter = len(expert_ids), text.hidden_size, text.moe_intermediate_size
        quant = self.config.quantization
        if quant is None:
            return self._normal((e, 2 * inter, h), self.std), self._normal((e, h, inter), self.std)
        return self._fp8((e, 2 * inter, h), quant.block, halves=quant.block is None), \
            self._fp8((e, h, inter), quant.block, halves=False)

    def _fp8(self, shape: tuple[int, int, int], block: tuple[int, int] | None, halves: bool) -> Fp8Experts:
        """fp8 weights whose dequantized values are normal with `std`: standard normal values (clipped
        to e4m3's range) times a scale of `std` in every block."""
        e, rows, cols = shape
        weight = torch.empty(shape, dtype=FP8, device=self.device)
        for i in range(e):  # one expert at a time: no full-size temporary in a wider dtype
            weight[i] = self._normal((rows, cols), 1.0).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        if block is not None:
            grid = (e, -(-rows // block[0]), -(-cols // block[1]))
            return Fp8Experts(weight, (ScaleSegment(0, rows, self._scale(grid)),), block)
        if halves:  # per-tensor gate_up: one scale for each half, as transformers keeps them
            half = rows // 2
            return Fp8Experts(weight, (ScaleSegment(0, half, self._scale((e, 1, 1))),
                                       ScaleSegment(half, rows, self._scale((e, 1, 1)))), None)
        return Fp8Experts(weight, (ScaleSegment(0, rows, self._scale((e, 1, 1))),), None)

    def _scale(self, shape: tuple[int, int, int]) -> torch.Tensor:
        return torch.full(shape, self.std, dtype=torch.float32, device=self.device)
