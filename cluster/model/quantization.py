"""A checkpoint's `quantization_config`, read with transformers' meanings (`FineGrainedFP8Config`,
`quant_method: "fp8"`), and everything else refused by name.

The two forms the engine runs:
- block-scaled: `weight_block_size` [rows, cols]; each weight has a `weight_scale_inv` grid of
  ceil(rows / b0) x ceil(cols / b1) float32 scales (edge blocks partial); activations dynamic.
- per-tensor: `weight_block_size` null; a scalar `weight_scale_inv` per weight, and with
  `activation_scheme: "static"` an `activation_scale`.
The weight is the e4m3fn value times its block's scale (transformers' `_dequantize_fp8_weight`);
on CPUs activations are not quantized, as transformers does there, so activation scales are read
by no one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.errors import CheckpointError, ConfigError, TensorMismatchError, UnsupportedCheckpointError

SUPPORTED = ("supported: unquantized weights, or quant_method 'fp8' with float8_e4m3fn weights, block-scaled "
             "(weight_block_size [rows, cols]) or per-tensor (weight_block_size null), and float32 scales")
_E4M3_NAMES = ("e4m3", "e4m3fn", "float8_e4m3fn")
FP8_DTYPE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
SCALE_SUFFIXES = ("_scale_inv", "activation_scale")


@dataclass(frozen=True)
class Quantization:
    """transformers' `quant_method: "fp8"`: block-scaled (`block` = [rows, cols]) or per-tensor
    (`block` None). `modules_to_not_convert` None means transformers' default (all but lm_head)."""

    block: tuple[int, int] | None
    activation_scheme: str  # "dynamic" | "static"
    modules_to_not_convert: tuple[str, ...] | None

    def describe(self) -> str:
        form = f"block {list(self.block)}" if self.block else "per-tensor"
        return f"fp8 e4m3 ({form}, {self.activation_scheme} activations)"


def quantization_config_of(raw: dict[str, Any]) -> tuple[str, Any]:
    """(where, the quantization_config) of a config.json dict: top level, else text_config's."""
    if raw.get("quantization_config") is not None:
        return "quantization_config", raw["quantization_config"]
    text = raw.get("text_config")
    if isinstance(text, dict) and text.get("quantization_config") is not None:
        return "text_config.quantization_config", text["quantization_config"]
    return "quantization_config", None


def parse_quantization(raw: dict[str, Any]) -> Quantization | None:
    """The quantization of a config.json dict, or None for an unquantized checkpoint."""
    where, quant = quantization_config_of(raw)
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json: {where} must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        detail = "".join(f", {k} {quant[k]!r}" for k in ("format", "quant_algo", "fmt") if k in quant)
        raise UnsupportedCheckpointError(f"config.json: {where}.quant_method {method!r}{detail} is not supported; "
                                         f"{SUPPORTED}")
    fmt = quant.get("fmt")
    if fmt is not None and str(fmt).lower() not in _E4M3_NAMES:
        raise UnsupportedCheckpointError(f"config.json: {where}.fmt {fmt!r} (fp8 weights in another format than "
                                         f"e4m3fn) is not supported; {SUPPORTED}")
    scale_fmt = quant.get("scale_fmt", "float")
    if scale_fmt == "ue8m0":
        raise UnsupportedCheckpointError(f"config.json: {where}.scale_fmt 'ue8m0' (power-of-two e8m0 scales) is "
                                         f"not supported; {SUPPORTED}")
    if scale_fmt != "float":
        raise ConfigError(f"config.json: {where}.scale_fmt must be 'float' or 'ue8m0', got {scale_fmt!r}")
    expert_dtype = quant.get("expert_dtype", "fp8")
    if expert_dtype == "fp4":
        raise UnsupportedCheckpointError(f"config.json: {where}.expert_dtype 'fp4' (fp4-packed experts) is not "
                                         f"supported; {SUPPORTED}")
    if expert_dtype != "fp8":
        raise ConfigError(f"config.json: {where}.expert_dtype must be 'fp8' or 'fp4', got {expert_dtype!r}")
    if quant.get("modules_to_convert"):
        raise UnsupportedCheckpointError(f"config.json: {where}.modules_to_convert {quant['modules_to_convert']!r} "
                                         f"(fp8 embedding tables) is not supported; {SUPPORTED}")
    scheme = quant.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ("dynamic", "static"):
        raise ConfigError(f"config.json: {where}.activation_scheme must be 'dynamic' or 'static', got {scheme!r}")
    return Quantization(_block(where, quant.get("weight_block_size", [128, 128])), scheme.lower(),
                        _skip_list(where, quant))


def _block(where: str, block: Any) -> tuple[int, int] | None:
    if block is None:
        return None
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"config.json: {where}.weight_block_size must be two positive integers or null, "
                          f"got {block!r}")
    return int(block[0]), int(block[1])


def _skip_list(where: str, quant: dict[str, Any]) -> tuple[str, ...] | None:
    # transformers takes MiniMax's `ignored_layers` as an alias
    skip = quant.get("modules_to_not_convert", quant.get("ignored_layers"))
    if skip is None:
        return None
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"config.json: {where}.modules_to_not_convert must be a list of module names, got {skip!r}")
    return tuple(skip)


def dtype_refusal(where: str, name: str, found: str, expected: str, part: str,
                  quant: Quantization | None) -> CheckpointError:
    """Why tensor `name` (safetensors dtype `found`, `expected` by config.json) is refused: a format
    the engine does not run, by name and with what it does, else a plain mismatch."""
    if expected == FP8_DTYPE and found.startswith("F8_"):
        return UnsupportedCheckpointError(f"{where}: tensor {name} is {found}: fp8 weights in a format other than "
                                          f"e4m3fn (F8_E4M3) are not supported; {SUPPORTED}")
    if expected == FP8_DTYPE and part == "experts" and found in ("I8", "U8", "F4"):
        return UnsupportedCheckpointError(f"{where}: tensor {name} is {found} (fp4-packed experts), not supported; "
                                          f"{SUPPORTED}")
    if name.endswith(SCALE_SUFFIXES) and found in ("F8_E8M0", "U8"):
        return UnsupportedCheckpointError(f"{where}: tensor {name} is {found} (ue8m0 scales), not supported; "
                                          f"{SUPPORTED}")
    if expected == FP8_DTYPE:
        why = f"quantization_config ({quant.describe() if quant else 'fp8'}) converts this module"
    elif found.startswith("F8_"):
        why = ("config.json has no quantization_config" if quant is None
               else "quantization_config.modules_to_not_convert leaves this module unquantized")
    else:
        why = "the unquantized tensors' dtype is the embeddings'"
    return TensorMismatchError(f"{where}: tensor {name} is {found}, expected {expected} ({why})")
