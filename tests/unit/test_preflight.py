"""Checks before start, in process: `LLM(...)` refuses a bad model directory with a typed error and a
one-line message before reading a weight, and the header checks name what they find."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster import LLM
from cluster.errors import (
    CheckpointError,
    CheckpointFileError,
    TensorMismatchError,
    TokenizerMismatchError,
    UnsupportedCheckpointError,
)
from cluster.model.preflight import check_model_dir
from tests.checkpoint_headers import edit_entries, edit_json, header_only_copy, read_entries, write_header_only

PREFIX = "language_model.model."


@pytest.fixture
def headers_only(tiny_ckpt, tmp_path) -> Path:
    return header_only_copy(tiny_ckpt, tmp_path / "tiny")


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any tensor read through safetensors fails the test."""
    import cluster.model.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError(f"weights opened: {args[:1]}")

    monkeypatch.setattr(checkpoint, "safe_open", refuse)


def set_shape(name: str, shape: list[int]):
    def edit(entries: dict) -> None:
        entries[name] = (entries[name][0], shape)
    return edit


@pytest.mark.parametrize("break_it, error, named", [
    (lambda d: (d / "model.safetensors").unlink(), CheckpointFileError, "no *.safetensors"),
    (lambda d: edit_entries(d, set_shape(PREFIX + "norm.weight", [63])), TensorMismatchError, "norm.weight"),
    (lambda d: edit_json(d / "config.json", lambda c: c.update(quantization_config={"quant_method": "nvfp4"})),
     UnsupportedCheckpointError, "'nvfp4'"),
    (lambda d: edit_json(d / "tekken.json", lambda t: t["image"].update(max_image_size=1024)),
     TokenizerMismatchError, "image.max_image_size is 1024"),
    (lambda d: (d / "tekken.json").unlink(), TokenizerMismatchError, "no tekken.json"),
])
def test_llm_refuses_before_reading_weights(headers_only, no_weight_reads, break_it, error, named):
    break_it(headers_only)
    with pytest.raises(error) as refused:
        LLM(headers_only)
    assert isinstance(refused.value, CheckpointError)
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_truncated_file_is_named(headers_only):
    path = headers_only / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(CheckpointFileError, match="incomplete download"):
        check_model_dir(headers_only)


def test_garbage_file_is_named(headers_only):
    (headers_only / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointFileError, match="not a safetensors file"):
        check_model_dir(headers_only)


def test_index_that_places_a_tensor_in_the_wrong_file(make_ckpt, tmp_path):
    model = header_only_copy(make_ckpt("tiny_2files", preset="tiny", num_files=2), tmp_path / "split")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name, file = next(iter(sorted(index["weight_map"].items())))
    other = next(f for f in set(index["weight_map"].values()) if f != file)
    index["weight_map"][name] = other
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TensorMismatchError, match=f"{other}: lacks tensor {name}"):
        check_model_dir(model)


def test_unexpected_and_mistyped_tensors(headers_only):
    extra = PREFIX + "layers.2.input_layernorm.weight"  # a third layer config.json does not have
    edit_entries(headers_only, lambda e: e.update({extra: ("F32", [64])}))
    with pytest.raises(TensorMismatchError, match=f"unexpected tensor {extra}"):
        check_model_dir(headers_only)
    edit_entries(headers_only, lambda e: e.pop(extra))
    name = PREFIX + "layers.0.mlp.gate.weight"
    edit_entries(headers_only, lambda e: e.update({name: ("BF16", e[name][1])}))
    with pytest.raises(TensorMismatchError, match=f"tensor {name} is BF16, expected F32"):
        check_model_dir(headers_only)


def test_lm_head_tie_both_ways(headers_only):
    """Tied by config.json's top-level flag (transformers' rule for mistral3): no lm_head needed;
    untied, its absence is named."""
    head = "language_model.lm_head.weight"
    edit_entries(headers_only, lambda e: e.pop(head))
    with pytest.raises(TensorMismatchError, match="no lm_head.weight"):
        check_model_dir(headers_only)
    edit_json(headers_only / "config.json", lambda c: c.update(tie_word_embeddings=True))
    report = check_model_dir(headers_only)
    assert report.tied_lm_head and report.params_by_part["dense"] == 16_839_104 - 131072 * 64


def test_native_mistral_files_are_left_alone(headers_only):
    """A directory that also holds Mistral's consolidated.safetensors (as the published repository
    does) is checked from the Hugging Face files only."""
    write_header_only(headers_only / "consolidated.safetensors", {"tok_embeddings.weight": ("BF16", [8, 8])})
    (headers_only / "params.json").write_text("{}")
    assert check_model_dir(headers_only).files == 1
    assert read_entries(headers_only / "consolidated.safetensors")  # still there, untouched
