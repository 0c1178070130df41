"""The tensors of a checkpoint as its safetensors headers describe them: names, dtypes, shapes and
files, read without touching a byte of weight data (no torch, no mmap).

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each name to
`{"dtype", "shape", "data_offsets"}`, then the data. The file size is checked against the header
(`stat`, no read), so an interrupted download is named here rather than at load time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import CheckpointError, CheckpointFileError, TensorMismatchError

INDEX_FILE = "model.safetensors.index.json"
# Mistral's native files, which a Hugging Face repository may also carry: never the HF weights.
NATIVE_PREFIX = "consolidated"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# Bits per element of every safetensors dtype.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "U32": 32, "I32": 32, "U64": 64, "I64": 64,
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6,
    "F6_E3M2": 6, "F4": 4,
}
# torch dtype names (config.json `dtype`) to safetensors dtypes.
TORCH_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@dataclass(frozen=True)
class TensorHeader:
    name: str
    dtype: str  # safetensors dtype: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    file: str  # relative to the model directory

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class CheckpointHeaders:
    """Every tensor of a model directory's weights, by name (the index's tensors when it has one)."""

    model_dir: Path
    tensors: dict[str, TensorHeader]
    files: tuple[str, ...]
    index: str | None

    def names(self) -> set[str]:
        return set(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: Path, name: str | None = None) -> dict[str, TensorHeader]:
    """The tensors of one safetensors file; `name` is how messages call it (default: the path)."""
    label = name or str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > _MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointFileError(f"{label}: not a safetensors file (header length {length}, "
                                          f"file size {size} bytes)")
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointFileError(f"{label}: missing") from None
    except OSError as exc:
        raise CheckpointFileError(f"{label}: unreadable ({exc.strerror or exc})") from None
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{label}: safetensors header is not JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise CheckpointFileError(f"{label}: safetensors header is not a JSON object")
    tensors: dict[str, TensorHeader] = {}
    data_end = 0
    for tensor, entry in entries.items():
        if tensor == "__metadata__":
            continue
        header = _tensor_header(label, tensor, entry, path.name)
        begin, end = entry["data_offsets"]
        if end - begin != header.nbytes:
            raise CheckpointFileError(f"{label}: tensor {tensor} spans {end - begin} bytes but its dtype "
                                      f"{header.dtype} and shape {list(header.shape)} make {header.nbytes}")
        data_end = max(data_end, end)
        tensors[tensor] = header
    if 8 + length + data_end > size:
        raise CheckpointFileError(f"{label}: {size} bytes on disk but its header describes "
                                  f"{8 + length + data_end} (an incomplete download?)")
    return tensors


def _tensor_header(label: str, tensor: str, entry: Any, file: str) -> TensorHeader:
    ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(
        entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
    ok = ok and all(isinstance(v, int) and v >= 0 for v in [*entry["shape"], *entry["data_offsets"]])
    if not ok:
        raise CheckpointFileError(f"{label}: malformed header entry for tensor {tensor}")
    if entry.get("dtype") not in DTYPE_BITS:
        raise TensorMismatchError(f"{label}: tensor {tensor} has dtype {entry.get('dtype')!r}, unknown to "
                                  "safetensors")
    return TensorHeader(tensor, entry["dtype"], tuple(entry["shape"]), file)


def weight_files(model_dir: Path) -> tuple[list[str], str | None, dict[str, str] | None]:
    """(files, index name, weight map): the index's files when there is one, else every
    `*.safetensors` except Mistral's native `consolidated*` files."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise CheckpointFileError(f"{index}: unreadable index ({exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFileError(f"{index}: no weight_map of tensor names to files")
        return sorted(set(weight_map.values())), INDEX_FILE, dict(weight_map)
    files = sorted(p.name for p in model_dir.glob("*.safetensors") if not p.name.startswith(NATIVE_PREFIX))
    if not files:
        raise CheckpointFileError(f"{model_dir}: no *.safetensors files (and no {INDEX_FILE})")
    return files, None, None


def read_checkpoint_headers(model_dir: str | Path) -> CheckpointHeaders:
    """The headers of every weight file; an index's files must all exist and hold what it maps to them."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    files, index, weight_map = weight_files(model_dir)
    per_file: dict[str, dict[str, TensorHeader]] = {}
    for file in files:
        if not (model_dir / file).is_file():
            raise CheckpointFileError(f"{model_dir / file}: missing (named by {index})")
        per_file[file] = read_header(model_dir / file)
    if weight_map is None:
        tensors = {n: h for headers in per_file.values() for n, h in headers.items()}
    else:
        tensors = {}
        for tensor, file in sorted(weight_map.items()):
            if tensor not in per_file[file]:
                raise TensorMismatchError(f"{model_dir / file}: lacks tensor {tensor}, which {index} places there")
            tensors[tensor] = per_file[file][tensor]
    return CheckpointHeaders(model_dir, tensors, tuple(files), index)
