"""config.json alone for a preset: what `load_format="dummy"` builds random weights from (no
weight file, no tokenizer, no mistral-common), e.g. the GPU check's `gpu-bench` model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.testing.presets import get_preset

IMG_TOKEN_ID = 10  # Tekken's [IMG]


def mistral3_config(preset: str, text_overrides: dict[str, Any] | None = None) -> Any:
    """transformers' Mistral3Config of a preset (Pixtral tower + Mistral4 text model)."""
    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    spec = get_preset(preset)
    text = {**spec.text, **(text_overrides or {})}
    return Mistral3Config(text_config=Mistral4Config(**text), vision_config=PixtralVisionConfig(**spec.vision),
                          image_token_index=IMG_TOKEN_ID, spatial_merge_size=spec.spatial_merge_size,
                          tie_word_embeddings=False)


def write_config_only(out: str | Path, preset: str, text_overrides: dict[str, Any] | None = None,
                      quantization_config: dict[str, Any] | None = None) -> Path:
    """`out/config.json` of the preset, with an FP8 `quantization_config` when given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = mistral3_config(preset, text_overrides).to_dict()
    config["architectures"] = ["Mistral3ForConditionalGeneration"]
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
