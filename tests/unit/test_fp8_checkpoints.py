"""FP8 checkpoints at the reader: partial loads, the meaning of the scales (transformers'
dequantization), experts kept in fp8, the dequantized cache, Mistral's native files left alone,
and every refused format named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, SamplingParams
from cluster.errors import ConfigError, TensorMismatchError, UnsupportedCheckpointError
from cluster.experts.placement import ExpertPlacement
from cluster.experts.shard import ExpertShard
from cluster.model.checkpoint import CheckpointReader
from cluster.model.fp8 import Fp8Experts
from cluster.model.routed_experts import DequantizedCache, RoutedExperts

BLOCK = (24, 32)  # tiny: I = 32, so the fused gate_up grid (3 rows) is not two stacked grids (2 + 2)
IDS = [3, 4, 9]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_ckpts(make_ckpt) -> Callable[[str, str], Path]:
    def make(form: str, layout: str) -> Path:
        return make_ckpt(f"fp8_{form}_{layout}", preset="tiny", seed=7, expert_layout=layout, fp8=form,
                         fp8_block=BLOCK)
    return make


def _transformers_dequantized(stored: dict[str, torch.Tensor], name: str, e: int, block: tuple[int, int] | None,
                              halves: int = 1) -> torch.Tensor:
    """Expert e of a stored fp8 tensor, dequantized by transformers' own functions."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    scale_name = name.removesuffix("weight") + "weight_scale_inv" if name.endswith(".weight") else f"{name}_scale_inv"
    w, s = stored[name], stored[scale_name]
    if not name.endswith(".weight"):
        w, s = w[e], s[e]
    if block is None and halves == 2:  # per-tensor fused gate_up: a [2, 1] grid, one scale per half
        return Fp8Dequantize(None)._dequantize_one(w, s, torch.float32)
    return _dequantize_fp8_weight(w, s, list(block) if block else None, torch.float32)


@pytest.mark.parametrize("form", ["block", "static"])
@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_partial_fp8_load_reads_only_its_experts_and_their_scales(fp8_ckpts, form: str, layout: str) -> None:
    ckpt = fp8_ckpts(form, layout)
    reader = CheckpointReader(ckpt)
    gate_up, down = reader.read_experts(1, IDS)
    p = f"{reader.text_prefix}layers.1.mlp.experts"
    if layout == "fused":
        expected = {f"{p}.{t}[{a}:{b}]" for t in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv",
                                                  "down_proj_scale_inv") for a, b in ((3, 5), (9, 10))}
    else:
        expected = {f"{p}.{e}.{proj}.{t}" for e in IDS for proj in ("gate_proj", "up_proj", "down_proj")
                    for t in ("weight", "weight_scale_inv")}
    assert set(reader.reads) == expected and len(reader.reads) == len(expected)
    assert isinstance(gate_up, Fp8Experts) and isinstance(down, Fp8Experts)
    assert gate_up.weight.dtype == torch.float8_e4m3fn and gate_up.weight.shape == (3, 64, 64)

    # The meaning is transformers' dequantization of the stored tensors (read whole, here).
    stored = load_file(ckpt / "model.safetensors")
    block = BLOCK if form == "block" else None
    for i, e in enumerate(IDS):
        if layout == "fused":
            want_gu = _transformers_dequantized(stored, f"{p}.gate_up_proj", e, block, halves=2)
            want_down = _transformers_dequantized(stored, f"{p}.down_proj", e, block)
        else:
            want_gu = torch.cat([_transformers_dequantized(stored, f"{p}.{e}.{proj}.weight", e, block)
                                 for proj in ("gate_proj", "up_proj")])
            want_down = _transformers_dequantized(stored, f"{p}.{e}.down_proj.weight", e, block)
        assert torch.equal(gate_up.dequantize(i, torch.float32), want_gu)
        assert torch.equal(down.dequantize(i, torch.float32), want_down)


def test_dense_weights_are_dequantized_in_the_compute_dtype(make_ckpt) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    ckpt = make_ckpt("fp8_block_bf16", preset="tiny", seed=7, dtype="bfloat16", fp8="block", fp8_block=BLOCK)
    reader = CheckpointReader(ckpt)
    assert reader.compute_dtype == torch.bfloat16
    dense = reader.dense_state_dict()
    stored = load_file(ckpt / "model.safetensors")
    name = "layers.0.self_attn.kv_a_proj_with_mqa.weight"
    full = reader.text_prefix + name
    want = _dequantize_fp8_weight(stored[full], stored[full.replace(".weight", ".weight_scale_inv")], list(BLOCK),
                                  torch.bfloat16)
    assert dense[name].dtype == torch.bfloat16 and torch.equal(dense[name], want)
    assert not any(n.endswith(("_scale_inv", "activation_scale")) for n in dense)


def test_routed_experts_stay_fp8_and_take_under_a_third_of_fp32(fp8_ckpts, tiny_ckpt: Path) -> None:
    fp8_reader, fp32_reader = CheckpointReader(fp8_ckpts("block", "fused")), CheckpointReader(tiny_ckpt)
    text = fp8_reader.config.text
    placement = ExpertPlacement.of_model(text, 2)
    fp8_shard, fp32_shard = ExpertShard(fp8_reader, placement, 1), ExpertShard(fp32_reader, placement, 1)
    experts = sum(len(placement.experts_of(1, layer)) for layer in text.moe_layers)
    fp32_bytes = experts * 3 * text.hidden_size * text.moe_intermediate_size * 4
    assert fp32_shard.resident_bytes() == fp32_bytes
    assert fp8_shard.resident_bytes() <= 0.30 * fp32_bytes
    assert all(e.fp8 is not None and e.fp8[0].weight.dtype == torch.float8_e4m3fn for e in fp8_shard.experts.values())
    assert fp8_shard.held() == fp32_shard.held()  # the same weights, element for element


def test_dequantized_cache_keeps_hot_experts_under_its_cap(fp8_ckpts) -> None:
    reader = CheckpointReader(fp8_ckpts("block", "per_expert"))
    text = reader.config.text
    gate_up, down = reader.read_experts(1, list(range(8)))
    per_expert = 3 * text.hidden_size * text.moe_intermediate_size * 4
    plain = RoutedExperts(text.n_routed_experts, range(8), gate_up, down, torch.float32)
    cache = DequantizedCache(3 * per_expert)
    cached = RoutedExperts(text.n_routed_experts, range(8), gate_up, down, torch.float32, cache, layer=1)
    gen = torch.Generator().manual_seed(0)
    for experts in ([0, 1, 2], [0, 1, 2], [3, 4, 5, 6, 7], [6, 7]):  # misses, hits, then colder experts
        hidden = torch.randn(6, text.hidden_size, generator=gen)
        ids = torch.tensor(experts)[torch.randint(0, len(experts), (6, 4), generator=gen)]
        weights = torch.rand(6, 4, generator=gen)
        assert torch.equal(cached(hidden, ids, weights), plain(hidden, ids, weights))
        cache.check_integrity()
        assert cache.nbytes <= 3 * per_expert
    assert cache.hits > 0 and plain.cache is None
    assert cached.resident_bytes() == plain.resident_bytes() == gate_up.nbytes + down.nbytes  # the cache: the shard's
    shard = ExpertShard(reader, ExpertPlacement.of_model(text, 1), 0, cache_bytes=3 * per_expert)
    shard.compute(1, hidden, ids, weights)
    assert shard.cache is not None and shard.cache.nbytes > 0
    assert shard.resident_bytes() == sum(e.resident_bytes() for e in shard.experts.values()) + shard.cache.nbytes


def test_cache_keeps_experts_when_a_step_uses_more_than_it_holds() -> None:
    entry = (torch.zeros(4), torch.zeros(4))  # 32 bytes
    cache = DequantizedCache(2 * 32)

    def use(key: tuple[int, int]) -> None:
        if cache.get(key) is None:
            cache.put(key, entry)

    for _ in range(3):  # steps walk 4 layers in order; least-recently-used eviction would never hit
        for layer in range(4):
            use((layer, 0))
    assert (cache.hits, cache.misses) == (4, 8)
    for _ in range(4):  # an expert used more often than a cached one takes its place
        use((9, 0))
    assert cache.get((9, 0)) is not None and cache.nbytes == 64
    cache.check_integrity()


def test_mistral_native_files_beside_the_hf_ones_are_left_alone(fp8_ckpts, tmp_path: Path) -> None:
    ckpt = fp8_ckpts("static", "fused")
    twin = tmp_path / "with-native"
    shutil.copytree(ckpt, twin)
    (twin / "params.json").write_text(json.dumps({"dim": 7, "n_layers": 1, "vocab_size": 3}))
    save_file({"tok_embeddings.weight": torch.zeros(3, 7), "language_model.model.embed_tokens.weight": torch.zeros(3)},
              twin / "consolidated.safetensors")
    reader = CheckpointReader(twin)
    reader.dense_state_dict()
    assert reader.reads and not any("consolidated" in r or "tok_embeddings" in r for r in reader.reads)
    prompts = [[1, 2000, 3000, 4000], [1, 77, 12345]]
    want = [o.token_ids for o in LLM(ckpt).generate(prompts, GREEDY, use_tqdm=False)]
    assert [o.token_ids for o in LLM(twin).generate(prompts, GREEDY, use_tqdm=False)] == want


def _variant(src: Path, dst: Path, quant: dict[str, Any] | None = None,
             tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if quant is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = {**cfg.get("quantization_config", {}), **quant}
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        state = load_file(dst / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("quant, found", [
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}, "compressed-tensors"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "NVFP4"),
    ({"quant_method": "mxfp4"}, "mxfp4"),
    ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ({"quant_method": "fp8", "scale_fmt": "ue8m0"}, "ue8m0"),
    ({"quant_method": "fp8", "expert_dtype": "fp4"}, "fp4"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
    ({"quant_method": "fp8", "modules_to_convert": ["model.language_model.embed_tokens"]}, "modules_to_convert"),
])
def test_unsupported_quantization_is_refused_by_name(tiny_ckpt: Path, tmp_path: Path, quant: dict[str, Any],
                                                     found: str) -> None:
    ckpt = _variant(tiny_ckpt, tmp_path / "q", quant)
    with pytest.raises(UnsupportedCheckpointError, match=rf"{found}.*not supported; supported: .*e4m3fn"):
        LLM(ckpt)


@pytest.mark.parametrize("quant, field", [
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
    ({"quant_method": "fp8", "scale_fmt": "half"}, "scale_fmt"),
    ({"quant_method": "fp8", "modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
])
def test_bad_fp8_settings_name_the_field(tiny_ckpt: Path, tmp_path: Path, quant: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"quantization_config.{field}"):
        LLM(_variant(tiny_ckpt, tmp_path / "q", quant))


def _retype(pattern: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(state: dict[str, torch.Tensor]) -> None:
        for name in [n for n in state if n.endswith(pattern)]:
            state[name] = state[name].float().to(dtype)
    return change


@pytest.mark.parametrize("pattern, dtype, message", [
    ("q_a_proj.weight", torch.float8_e5m2, "F8_E5M2: fp8 weights in a format other than e4m3fn"),
    ("experts.gate_up_proj", torch.int8, "I8 \\(fp4-packed experts\\)"),
    ("experts.down_proj_scale_inv", torch.float8_e8m0fnu, "F8_E8M0 \\(ue8m0 scales\\)"),
])
def test_unsupported_tensor_formats_are_refused_by_name(fp8_ckpts, tmp_path: Path, pattern: str,
                                                        dtype: torch.dtype, message: str) -> None:
    ckpt = _variant(fp8_ckpts("block", "fused"), tmp_path / "t", tensors=_retype(pattern, dtype))
    with pytest.raises(UnsupportedCheckpointError, match=rf"{pattern}.*{message}.*supported: "):
        LLM(ckpt)  # the checks before start
    reader = CheckpointReader(ckpt)  # ... and the engine's own reading
    with pytest.raises(UnsupportedCheckpointError, match=message):
        reader.dense_state_dict()
        reader.read_experts(1, [0])


def test_a_fused_grid_of_another_shape_is_refused_by_name(fp8_ckpts, tmp_path: Path) -> None:
    def stacked(state: dict[str, torch.Tensor]) -> None:
        # a gate grid and an up grid stacked: 2 x ceil(32 / 24) = 4 rows, where the fused grid has ceil(64 / 24) = 3
        for name in [n for n in state if n.endswith("gate_up_proj_scale_inv")]:
            state[name] = torch.ones(16, 4, 2)

    ckpt = _variant(fp8_ckpts("block", "fused"), tmp_path / "g", tensors=stacked)
    grid = r"layers\.\d\.mlp\.experts\.gate_up_proj_scale_inv"
    with pytest.raises(TensorMismatchError, match=rf"{grid}.*\[16, 4, 2\].*\[16, 3, 2\]"):
        LLM(ckpt)
    with pytest.raises(TensorMismatchError, match=rf"{grid} has scale grid \[16, 4, 2\]; config.json implies "
                                                  r"\[16, 3, 2\]"):
        CheckpointReader(ckpt).read_experts(1, [0])


def test_modules_to_not_convert_is_honoured(fp8_ckpts, tmp_path: Path) -> None:
    src = fp8_ckpts("block", "fused")
    skip = json.loads((src / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    # the projector is unquantized in the files; a list that no longer skips it expects it in fp8
    converted = _variant(src, tmp_path / "c", {"modules_to_not_convert": [s for s in skip if "projector" not in s]})
    with pytest.raises(TensorMismatchError, match=r"multi_modal_projector\.linear_1\.weight is F32, expected "
                                                  r"F8_E4M3 \(quantization_config .* converts this module\)"):
        CheckpointReader(converted).vision_state_dict("multi_modal_projector.")
    # an fp8 module the list says to leave alone
    kept = _variant(src, tmp_path / "k", {"modules_to_not_convert": [*skip, "model.language_model.layers.0.mlp"]})
    with pytest.raises(TensorMismatchError, match=r"layers\.0\.mlp\.shared_experts\.\w+_proj\.weight is F8_E4M3, "
                                                  "expected F32 .*modules_to_not_convert leaves this module"):
        LLM(kept)


def test_an_fp8_vision_tower_is_dequantized_at_load(tiny_ckpt: Path, tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from cluster.model.vision import VisionEncoder
    from cluster.testing.fp8_writer import write_fp8

    ckpt = tmp_path / "vision-fp8"
    shutil.copytree(tiny_ckpt, ckpt)
    write_fp8(ckpt, "block", BLOCK, skip=("lm_head",))  # the tower and projector converted too
    stored = load_file(ckpt / "model.safetensors")
    name = "vision_tower.transformer.layers.0.attention.q_proj.weight"
    assert stored[name].dtype == torch.float8_e4m3fn
    encoder = VisionEncoder.from_reader(CheckpointReader(ckpt))
    want = _dequantize_fp8_weight(stored[name], stored[name.replace(".weight", ".weight_scale_inv")], list(BLOCK),
                                  torch.float32)
    assert torch.equal(encoder.tower.get_parameter(name.removeprefix("vision_tower.")), want)
    assert encoder.encode([torch.rand(3, 32, 64)])[0].shape == (2, 64)


@pytest.mark.parametrize("args, block", [(["--fp8", "static"], None), (["--fp8", "block", "--fp8-block", "32,16"],
                                                                        [32, 16])])
def test_make_checkpoint_writes_fp8(tmp_path: Path, args: list[str], block: list[int] | None) -> None:
    from deployments.cli import main

    out = tmp_path / "ckpt"
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--expert-layout", "per_expert", *args]) == 0
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == block
    assert quant["activation_scheme"] == ("static" if block is None else "dynamic")
    stored = load_file(out / "model.safetensors")
    assert stored["language_model.model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["language_model.lm_head.weight"].dtype == torch.float32
    outs = LLM(out).generate([[1, 500, 600]], GREEDY, use_tqdm=False)
    assert len(outs[0].token_ids) == GREEDY.max_tokens
