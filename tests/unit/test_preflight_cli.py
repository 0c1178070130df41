"""Checks before start, as a user meets them: `moe-cluster serve / generate / check` on a bad model
directory exit with status 2 and one line naming the problem, without importing Ray or reading a
weight byte. Each command runs in its own process under tests/no_weight_reads.py, on header-only
checkpoints (tests/checkpoint_headers.py): their data sections were never written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoint_headers import edit_entries, edit_json, fp8_header_only, header_only_copy
from tests.e2e.support import free_port

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "language_model.model."


def run_guarded(*argv: str) -> tuple[dict, str, str]:
    """(probe, stdout without the probe line, stderr) of `moe-cluster argv` under the guard."""
    done = subprocess.run([sys.executable, "-m", "tests.no_weight_reads", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"the guard itself failed (a weight read?):\n{done.stderr[-3000:]}"
    return json.loads(lines[-1]), "\n".join(lines[:-1]), done.stderr


def serve_argv(model: Path) -> list[str]:
    return ["serve", "--model", str(model), "--http-port", str(free_port()), "--grpc-port", str(free_port())]


def assert_refused(probe: dict, stderr: str, *named: str) -> None:
    assert probe["rc"] == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-cluster: error: "), stderr
    for part in named:
        assert part in lines[0], (part, lines[0])
    assert not probe["ray_imported"] and not probe["ray_initialized"]


@pytest.fixture
def headers_only(tiny_ckpt, tmp_path) -> Path:
    return header_only_copy(tiny_ckpt, tmp_path / "tiny")


def test_missing_safetensors_file(make_ckpt, tmp_path):
    model = header_only_copy(make_ckpt("tiny_2files", preset="tiny", num_files=2), tmp_path / "split")
    files = sorted(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values())
    (model / files[-1]).unlink()
    probe, _, err = run_guarded(*serve_argv(model))
    assert_refused(probe, err, files[-1], "missing", "model.safetensors.index.json")


def test_wrong_tensor_shape(headers_only):
    name = PREFIX + "layers.1.self_attn.kv_b_proj.weight"

    def narrow(entries: dict) -> None:
        dtype, shape = entries[name]
        entries[name] = (dtype, [shape[0], shape[1] - 1])

    edit_entries(headers_only, narrow)
    probe, _, err = run_guarded(*serve_argv(headers_only))
    assert_refused(probe, err, "model.safetensors", name, "[192, 31]", "config.json implies [192, 32]")


@pytest.mark.parametrize("block, scheme, scale", [
    ([32, 64], "dynamic", "layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"),
    (None, "static", "layers.1.mlp.experts.down_proj_scale_inv"),
])
def test_missing_scale(tiny_ckpt, tmp_path, block, scheme, scale):
    model = fp8_header_only(tiny_ckpt, tmp_path / "fp8", block, scheme)
    probe, out, err = run_guarded("check", "--model", str(model))  # the FP8 checkpoint itself passes
    assert probe["rc"] == 0, err
    assert "quantization fp8 e4m3" in out
    edit_entries(model, lambda entries: entries.pop(PREFIX + scale))
    probe, _, err = run_guarded(*serve_argv(model))
    assert_refused(probe, err, "missing tensor " + PREFIX + scale, "fp8")


def test_unknown_quantization_method(headers_only):
    edit_json(headers_only / "config.json",
              lambda c: c.update(quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": None}))
    probe, _, err = run_guarded(*serve_argv(headers_only))
    assert_refused(probe, err, "quant_method", "'mxfp4'", "fp8")


def test_tokenizer_image_section_that_does_not_match_the_tower(headers_only):
    edit_json(headers_only / "tekken.json", lambda t: t["image"].update(image_patch_size=14))
    probe, _, err = run_guarded(*serve_argv(headers_only))
    assert_refused(probe, err, "tekken.json", "image.image_patch_size is 14", "vision_config.patch_size is 16")


@pytest.mark.parametrize("command", ["generate", "check"])
def test_generate_and_check_refuse_the_same_way(headers_only, command):
    edit_json(headers_only / "tekken.json", lambda t: t["image"].update(spatial_merge_size=1))
    argv = ["generate", "Hi", "--model", str(headers_only)] if command == "generate" else \
        ["check", "--model", str(headers_only)]
    probe, _, err = run_guarded(*argv)
    assert_refused(probe, err, "image.spatial_merge_size is 1")


def test_check_passes_on_headers_alone_and_summarizes(headers_only):
    probe, out, err = run_guarded("check", "--model", str(headers_only))
    assert probe["rc"] == 0 and not probe["ray_imported"], err
    assert "all checks passed" in out
    # the tiny preset's numbers, worked out by hand: KV (32 + 16) x 2 layers x 4 bytes
    assert "KV cache: 384 bytes per token" in out
    assert "16 routed (top 4) + 1 shared" in out and "tekken v15" in out and "patch 16, spatial merge 2" in out


def test_the_guard_catches_a_weight_read(headers_only):
    """Control: generating needs the weights, so under the guard it fails with a weight read."""
    done = subprocess.run([sys.executable, "-m", "tests.no_weight_reads", "generate", "Hi", "--model",
                           str(headers_only), "--max-tokens", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "WeightBytesRead" in done.stderr
