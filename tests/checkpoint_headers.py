"""Header-only checkpoints for the checks before start.

Every safetensors file keeps its header and its size, but its data section is a hole: never
written, it reads as zeros. A check that passes on such a copy had nothing but headers to go on;
`tests/no_weight_reads.py` makes sure nothing reads past them. The helpers parse and write headers
with their own few lines (8-byte length, JSON), not with the code under test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

Entries = dict[str, tuple[str, list[int]]]  # name -> (safetensors dtype, shape)
_BITS = {"F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "I64": 64}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def read_entries(path: Path) -> Entries:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def write_header_only(path: Path, entries: Entries) -> None:
    """A safetensors file of `entries` whose data bytes are a hole of the right size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in entries.items():
        numel = 1
        for d in shape:
            numel *= d
        size = numel * _BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def header_only_copy(src: Path, dst: Path) -> Path:
    """`src` with every safetensors file reduced to its header (same size, no data written)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            write_header_only(dst / f.name, read_entries(f))
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def edit_entries(model_dir: Path, edit: Callable[[Entries], None]) -> None:
    """Rewrites every safetensors file of `model_dir` (header-only) after `edit` changed its entries."""
    for f in sorted(model_dir.glob("*.safetensors")):
        entries = read_entries(f)
        edit(entries)
        write_header_only(f, entries)


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def fp8_header_only(src: Path, dst: Path, block: list[int] | None, scheme: str) -> Path:
    """A header-only FP8 checkpoint of `src`'s model: its tensors as transformers' FP8 quantizer
    holds them (replace_with_fp8_linear on a meta-device model: e4m3 weights, float32
    `weight_scale_inv` grids or scalars, static activation scales), under the names `src` saved."""
    from transformers import FineGrainedFP8Config, Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    config = json.loads((src / "config.json").read_text())
    quant = {"quant_method": "fp8", "weight_block_size": block, "activation_scheme": scheme,
             "modules_to_not_convert": ["lm_head"]}
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(Mistral3Config.from_dict(config))
    model = replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"], pre_quantized=True,
                                    quantization_config=FineGrainedFP8Config(weight_block_size=block,
                                                                             activation_scheme=scheme))
    entries: Entries = {}
    for name, t in model.state_dict().items():
        saved = ("language_model.model." + name[len("model.language_model."):]
                 if name.startswith("model.language_model.") else
                 "language_model.lm_head.weight" if name == "lm_head.weight" else name[len("model."):])
        entries[saved] = (_ST_DTYPES[t.dtype], list(t.shape))
    dst.mkdir(parents=True, exist_ok=True)
    write_header_only(dst / "model.safetensors", entries)
    config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "tekken.json", dst / "tekken.json")
    return dst
