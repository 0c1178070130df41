"""Reading Hugging Face safetensors checkpoints, whole or in part, unquantized or FP8.

An engine reads the dense part only; an expert shard reads only its experts' tensors (slices
of fused `gate_up_proj` / `down_proj` and of their scale grids, or its own per-expert tensors).
`reads` records every tensor (and slice) taken from disk so tests can prove a partial load stays
partial. Every tensor read is checked against `tensor_specs.expected_tensors` (the one place
that knows names, shapes and dtypes, scales included) and refused by name when it differs.

FP8 (`quantization.py`): dense and vision weights are dequantized at load into the compute dtype
(the unquantized tensors' dtype); routed experts stay fp8 with their scales (`Fp8Experts`) and
are dequantized per use. Mistral's native files (`params.json`, `consolidated*.safetensors`)
beside the Hugging Face ones are never read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cluster.errors import CheckpointError, TensorMismatchError
from cluster.model.config import ModelConfig, load_model_config
from cluster.model.fp8 import ExpertMatrices, Fp8Experts, ScaleSegment, dequantize
from cluster.model.quantization import FP8_DTYPE, SCALE_SUFFIXES, dtype_refusal
from cluster.model.safetensors_header import INDEX_FILE, weight_files
from cluster.model.tensor_specs import TensorSpec, expected_tensors

_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.", "")
_LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
_VISION_PREFIXES = ("", "model.")  # legacy save layout, then the transformers v5 one
_VISION_ROOTS = ("vision_tower.", "multi_modal_projector.")
_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def is_scale(name: str) -> bool:
    """A scale tensor of an FP8 checkpoint (`weight_scale_inv`, `*_proj_scale_inv`, activation scales)."""
    return name.endswith(SCALE_SUFFIXES)


def is_routed_expert(rel: str) -> bool:
    return ".mlp.experts." in rel


class CheckpointReader:
    def __init__(self, model_dir: str | Path, config: ModelConfig | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.config = config or load_model_config(self.model_dir)
        self._weight_map = self._load_weight_map()
        self._handles: dict[str, Any] = {}
        self._specs: dict[str, TensorSpec] | None = None
        self.reads: list[str] = []
        text_prefix = next(
            (p for p in _TEXT_PREFIXES if f"{p}embed_tokens.weight" in self._weight_map), None)
        if text_prefix is None:
            raise CheckpointError(f"{self.model_dir}: no embed_tokens.weight under any known prefix "
                                  f"{[p for p in _TEXT_PREFIXES if p]}")
        self.text_prefix: str = text_prefix
        self.vision_prefix = next((p for p in _VISION_PREFIXES if any(
            n.startswith(p + "vision_tower.") for n in self._weight_map)), None)
        self.lm_head_name = next((n for n in _LM_HEADS if n in self._weight_map), None)
        if self.lm_head_name is None and not self.config.text.tie_word_embeddings:
            flag = "tie_word_embeddings" if self.config.model_type == "mistral3" else "tie_word_embeddings (mistral4)"
            raise CheckpointError(f"{self.model_dir}: no lm_head.weight, and config.json's {flag} is false")
        embed_dtype, _ = self.header(self.text_prefix + "embed_tokens.weight")
        if embed_dtype not in _TORCH_DTYPES:
            raise TensorMismatchError(f"{self.model_dir}: {self.text_prefix}embed_tokens.weight is {embed_dtype}; "
                                      f"the unquantized tensors must be one of {sorted(_TORCH_DTYPES)}")
        self.unquantized_dtype = embed_dtype  # safetensors name, e.g. "BF16"
        self.compute_dtype: torch.dtype = _TORCH_DTYPES[embed_dtype]

    def _load_weight_map(self) -> dict[str, str]:
        files, index, indexed = weight_files(self.model_dir)  # never Mistral's consolidated* files
        for file in files:
            if not (self.model_dir / file).is_file():
                raise CheckpointError(f"{self.model_dir / INDEX_FILE} names {file}, which is missing")
        if indexed is not None:
            return indexed
        weight_map: dict[str, str] = {}
        for file in files:
            with safe_open(self.model_dir / file, "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file))
        return weight_map

    def _handle(self, name: str) -> Any:  # safetensors has no public handle type
        file = self._weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.model_dir / file, "pt")
        return self._handles[file]

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of an absolute name, from the file's header (no data read)."""
        sl = self._handle(name).get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    # -- names -------------------------------------------------------------------------------

    def text_names(self) -> list[str]:
        """Weight names of the text model, relative to its prefix (lm_head as `lm_head.weight`);
        FP8 scales are not listed (they go with their weight)."""
        p = self.text_prefix
        names = [n[len(p):] for n in self._weight_map if n.startswith(p) and n not in _LM_HEADS]
        names = [n for n in names if not n.startswith(_VISION_ROOTS) and not is_scale(n)]
        if self.lm_head_name:
            names.append("lm_head.weight")
        return sorted(names)

    def _full_name(self, rel: str) -> str:
        if rel == "lm_head.weight":
            # without one (tied embeddings) the name is missing from the map, and `read` says so
            return self.lm_head_name or rel
        return self.text_prefix + rel

    def has(self, rel: str) -> bool:
        return self._full_name(rel) in self._weight_map if rel != "lm_head.weight" else bool(self.lm_head_name)

    def names_with_prefix(self, prefix: str) -> list[str]:
        """Absolute names starting with `prefix`."""
        return sorted(n for n in self._weight_map if n.startswith(prefix))

    # -- what the checkpoint must hold ---------------------------------------------------------

    def expected(self) -> dict[str, TensorSpec]:
        """Every tensor the engine reads, by name relative to its prefix (text or vision)."""
        if self._specs is None:
            layout = self.expert_layout(self.config.text.moe_layers[0]) if self.config.text.moe_layers else "fused"
            specs = expected_tensors(self.config, layout, self.unquantized_dtype, lm_head=self.lm_head_name is not None,
                                     quant=self.config.quantization)
            self._specs = {s.name: s for s in specs}
        return self._specs

    def _check(self, name: str, spec_name: str) -> TensorSpec | None:
        """Refuses a tensor whose dtype or shape is not what config.json implies (by name)."""
        spec = self.expected().get(spec_name)
        if spec is None:
            return None
        dtype, shape = self.header(name)
        where = self.model_dir / self._weight_map[name]
        if dtype != spec.dtype:
            raise dtype_refusal(str(where), name, dtype, spec.dtype, spec.part, self.config.quantization)
        if shape != spec.shape:
            what = "scale grid" if is_scale(name) else "shape"
            raise TensorMismatchError(f"{where}: tensor {name} has {what} {list(shape)}; config.json implies "
                                      f"{list(spec.shape)}" + (f" ({self.config.quantization.describe()})"
                                                               if self.config.quantization else ""))
        return spec

    # -- reading -----------------------------------------------------------------------------

    def read(self, rel: str) -> torch.Tensor:
        """A text tensor as stored (relative name)."""
        return self.read_absolute(self._full_name(rel), rel)

    def read_absolute(self, name: str, spec_name: str | None = None) -> torch.Tensor:
        if name not in self._weight_map:
            raise TensorMismatchError(f"{self.model_dir}: missing tensor {name}")
        self._check(name, spec_name if spec_name is not None else name)
        self.reads.append(name)
        return self._handle(name).get_tensor(name)

    def _read_weight(self, name: str, spec_name: str) -> torch.Tensor:
        """A weight in the compute dtype: dequantized when the checkpoint holds it in fp8."""
        spec = self._check(name, spec_name)
        if spec is None or spec.dtype != FP8_DTYPE:
            return self.read_absolute(name, spec_name)
        scale = name.removesuffix(".weight") + ".weight_scale_inv"
        spec_scale = spec_name.removesuffix(".weight") + ".weight_scale_inv"
        return dequantize(self.read_absolute(name, spec_name), self.read_absolute(scale, spec_scale), self._block(),
                          self.compute_dtype)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every text weight except the routed experts, in the compute dtype (fp8 dequantized)."""
        return {n: self._read_weight(self._full_name(n), n) for n in self.text_names() if not is_routed_expert(n)}

    def vision_state_dict(self, root: str) -> dict[str, torch.Tensor]:
        """The weights under `root` ("vision_tower." or "multi_modal_projector."), named relative to
        it, in the compute dtype (fp8 dequantized)."""
        if self.vision_prefix is None:
            raise CheckpointError(f"{self.model_dir}: no vision_tower.* tensors (tried prefixes {_VISION_PREFIXES})")
        full_root = self.vision_prefix + root
        return {n[len(full_root):]: self._read_weight(n, n[len(self.vision_prefix):])
                for n in self.names_with_prefix(full_root) if not is_scale(n)}

    def expert_layout(self, layer: int) -> str:
        if self.has(f"layers.{layer}.mlp.experts.gate_up_proj"):
            return "fused"
        if self.has(f"layers.{layer}.mlp.experts.0.gate_proj.weight"):
            return "per_expert"
        raise TensorMismatchError(f"{self.model_dir}: layer {layer} has no routed expert tensors "
                                  "(neither mlp.experts.gate_up_proj nor mlp.experts.N.gate_proj.weight)")

    def read_experts(self, layer: int, expert_ids: Sequence[int]) -> tuple[ExpertMatrices, ExpertMatrices]:
        """gate_up [E, 2I, H] and down [E, H, I] for `expert_ids` of `layer`, reading only those
        (and only their scales): tensors as stored, or `Fp8Experts` for an FP8 checkpoint."""
        if not expert_ids:
            raise CheckpointError("read_experts needs at least one expert id")
        inter = self.config.text.moe_intermediate_size
        base = f"layers.{layer}.mlp.experts"
        if self.expert_layout(layer) == "fused":
            gate_up, down = (self._read_rows(f"{base}.{p}", expert_ids) for p in ("gate_up_proj", "down_proj"))
            if gate_up.dtype != torch.float8_e4m3fn:
                return gate_up, down
            block = self._block()
            gu_scale, down_scale = (self._read_rows(f"{base}.{p}_scale_inv", expert_ids)
                                    for p in ("gate_up_proj", "down_proj"))
            # Block grids are read over the fused [2I, H] matrix; per-tensor, transformers keeps
            # one scale for each half ([E, 2, 1]).
            halves = (ScaleSegment(0, 2 * inter, gu_scale),) if block else (
                ScaleSegment(0, inter, gu_scale[:, 0:1]), ScaleSegment(inter, 2 * inter, gu_scale[:, 1:2]))
            return (Fp8Experts(gate_up, halves, block),
                    Fp8Experts(down, (ScaleSegment(0, down.shape[1], down_scale),), block))
        names = {p: [f"{base}.{e}.{p}.weight" for e in expert_ids] for p in ("gate_proj", "up_proj", "down_proj")}
        weights = {p: torch.stack([self.read(n) for n in ns]) for p, ns in names.items()}
        gate_up = torch.cat([weights["gate_proj"], weights["up_proj"]], dim=1)  # [E, 2I, H]
        if gate_up.dtype != torch.float8_e4m3fn:
            return gate_up, weights["down_proj"]
        scales = {p: torch.stack([self.read(n.removesuffix(".weight") + ".weight_scale_inv").reshape(
            self.expected()[n.removesuffix(".weight") + ".weight_scale_inv"].shape or (1, 1)) for n in ns])
            for p, ns in names.items()}  # [E, r, c] each ([E, 1, 1] per-tensor)
        block = self._block()
        return (Fp8Experts(gate_up, (ScaleSegment(0, inter, scales["gate_proj"]),
                                     ScaleSegment(inter, 2 * inter, scales["up_proj"])), block),
                Fp8Experts(weights["down_proj"], (ScaleSegment(0, self.config.text.hidden_size,
                                                               scales["down_proj"]),), block))

    def _block(self) -> tuple[int, int] | None:
        quant = self.config.quantization
        if quant is None:
            raise CheckpointError(f"{self.model_dir}: fp8 expert weights but config.json has no quantization_config")
        return quant.block

    def _read_rows(self, rel: str, rows: Sequence[int]) -> torch.Tensor:
        name = self._full_name(rel)
        if name not in self._weight_map:
            raise TensorMismatchError(f"{self.model_dir}: missing tensor {name}")
        self._check(name, rel)
        sl = self._handle(name).get_slice(name)
        count = sl.get_shape()[0]
        parts = []
        for start, stop in _runs(rows):
            if stop > count:
                raise CheckpointError(f"{name} has {count} experts; asked for up to {stop - 1}")
            self.reads.append(f"{name}[{start}:{stop}]")
            parts.append(sl[start:stop])
        return torch.cat(parts)


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: contiguous runs, in the order given."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs

