"""Reading Hugging Face safetensors checkpoints, whole or in part.

A router reads the dense part only; an expert shard reads only its experts' tensors (slices
of fused `gate_up_proj` / `down_proj`, or its own per-expert tensors). `reads` records every
tensor (and slice) taken from disk so tests can prove a partial load stays partial.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from cluster.errors import CheckpointError
from cluster.model.config import ModelConfig, load_model_config

_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.", "")
_LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
_FUSED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointReader:
    def __init__(self, model_dir: str | Path, config: ModelConfig | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.config = config or load_model_config(self.model_dir)
        self._weight_map = self._load_weight_map()
        self._handles: dict[str, object] = {}
        self.reads: list[str] = []
        text_prefix = next(
            (p for p in _TEXT_PREFIXES if f"{p}embed_tokens.weight" in self._weight_map), None)
        if text_prefix is None:
            raise CheckpointError(f"{self.model_dir}: no embed_tokens.weight under any known prefix "
                                  f"{[p for p in _TEXT_PREFIXES if p]}")
        self.text_prefix: str = text_prefix
        self.lm_head_name = next((n for n in _LM_HEADS if n in self._weight_map), None)
        if self.lm_head_name is None and not self.config.text.tie_word_embeddings:
            raise CheckpointError(f"{self.model_dir}: no lm_head.weight and tie_word_embeddings is false")

    def _load_weight_map(self) -> dict[str, str]:
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            indexed = json.loads(index.read_text()).get("weight_map")
            if not isinstance(indexed, dict):
                raise CheckpointError(f"{index}: no weight_map")
            for file in set(indexed.values()):
                if not (self.model_dir / file).is_file():
                    raise CheckpointError(f"{index} names {file}, which is missing")
            return dict(indexed)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.model_dir}: no *.safetensors files")
        weight_map: dict[str, str] = {}
        for file in files:
            with safe_open(file, "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
        return weight_map

    def _handle(self, name: str):  # noqa: ANN202 - safetensors has no public handle type
        file = self._weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.model_dir / file, "pt")
        return self._handles[file]

    # -- names -------------------------------------------------------------------------------

    def text_names(self) -> list[str]:
        """Tensor names of the text model, relative to its prefix (lm_head as `lm_head.weight`)."""
        p = self.text_prefix
        names = [n[len(p):] for n in self._weight_map if n.startswith(p) and n not in _LM_HEADS]
        names = [n for n in names if not n.startswith(("vision_tower.", "multi_modal_projector."))]
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
        """Absolute names starting with `prefix` (for the vision tower and projector)."""
        return sorted(n for n in self._weight_map if n.startswith(prefix))

    # -- reading -----------------------------------------------------------------------------

    def read(self, rel: str) -> torch.Tensor:
        name = self._full_name(rel)
        if name not in self._weight_map:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name}")
        self.reads.append(name)
        return self._handle(name).get_tensor(name)

    def read_absolute(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self._handle(name).get_tensor(name)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every text tensor except the routed experts."""
        return {n: self.read(n) for n in self.text_names()
                if not (_FUSED.match(n) or _PER_EXPERT.match(n))}

    def expert_layout(self, layer: int) -> str:
        if self.has(f"layers.{layer}.mlp.experts.gate_up_proj"):
            return "fused"
        if self.has(f"layers.{layer}.mlp.experts.0.gate_proj.weight"):
            return "per_expert"
        raise CheckpointError(f"{self.model_dir}: layer {layer} has no routed expert tensors "
                              "(neither mlp.experts.gate_up_proj nor mlp.experts.N.gate_proj.weight)")

    def read_experts(self, layer: int, expert_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [E, 2I, H] and down [E, H, I] for `expert_ids` of `layer`, reading only those."""
        if not expert_ids:
            raise CheckpointError("read_experts needs at least one expert id")
        if self.expert_layout(layer) == "fused":
            return (self._read_rows(f"layers.{layer}.mlp.experts.gate_up_proj", expert_ids),
                    self._read_rows(f"layers.{layer}.mlp.experts.down_proj", expert_ids))
        gate_up, down = [], []
        for e in expert_ids:
            base = f"layers.{layer}.mlp.experts.{e}"
            gate_up.append(torch.cat([self.read(f"{base}.gate_proj.weight"), self.read(f"{base}.up_proj.weight")]))
            down.append(self.read(f"{base}.down_proj.weight"))
        return torch.stack(gate_up), torch.stack(down)

    def _read_rows(self, rel: str, rows: Sequence[int]) -> torch.Tensor:
        name = self._full_name(rel)
        if name not in self._weight_map:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name}")
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
