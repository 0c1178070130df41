"""`moe-cluster plan` on Mistral Small 4's real dimensions (transformers' `Mistral4Config()` and
`PixtralVisionConfig()` defaults), from config.json alone. Every expected number is worked out by
hand below, not by the code under test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from cluster.model.footprint import footprint_of_config, footprint_of_report
from cluster.model.preflight import check_model_dir
from deployments.cli import main
from deployments.config import load_config
from deployments.memory_plan import ClusterSpec, LayoutDoesNotFitError, Workload, plan_layout
from tests.checkpoint_headers import fp8_header_only

GIB = 2**30
H200 = 140 * GIB
USABLE = int(H200 * 0.9)  # 135,291,469,824 bytes
CONTEXT = 262_144

# -- by hand: H 4096, 36 layers, 32 heads, q_lora 1024, kv_lora 256, rope 64, nope 64, v 128,
#    128 experts of 2048 (+1 shared), vocab 131072; Pixtral 1024 wide, 24 layers, patch 16, image 1024.
LINEAR = (1024 * 4096          # q_a_proj
          + 32 * 128 * 1024    # q_b_proj: heads x (nope + rope)
          + (256 + 64) * 4096  # kv_a_proj_with_mqa
          + 32 * (64 + 128) * 256  # kv_b_proj
          + 4096 * 32 * 128    # o_proj
          + 3 * 2048 * 4096)   # shared expert gate, up, down
assert LINEAR == 53_215_232
NORMS_AND_GATE = (4096 + 4096 + 1024 + 256) + 128 * 4096  # four RMSNorms, the MoE gate
EMBED = 131072 * 4096
DENSE_PARAMS = 36 * (LINEAR + NORMS_AND_GATE) + 2 * EMBED + 4096  # + embed, lm_head, final norm
EXPERT_PARAMS = 3 * 2048 * 4096  # one expert of one layer
VISION_PARAMS = (1024 * 3 * 16 * 16 + 1024  # patch_conv, ln_pre
                 + 24 * (4 * 1024 * 1024 + 2 * 1024 + 3 * 4096 * 1024)  # attention, norms, feed-forward
                 + 1024 + 1024 * 4 * 1024 + 4096 * 1024 + 4096 * 4096)  # projector: norm, merger, linear_1, linear_2
assert (DENSE_PARAMS, VISION_PARAMS) == (3_008_709_632, 428_656_640)

# bf16: two bytes each
BF16 = {"dense": 2 * DENSE_PARAMS, "expert": 2 * EXPERT_PARAMS, "vision": 2 * VISION_PARAMS}
# FP8 block [128, 128]: linear weights one byte plus a float32 scale per 128 x 128 block (ceil);
# norms, gate, embeddings, lm_head and the vision tower (not converted) in bf16.
SCALES = (8 * 32 + 32 * 8 + 3 * 32 + 48 * 2 + 32 * 32 + 2 * 16 * 32 + 32 * 16)  # per layer, 320 rows -> 3 blocks
FP8 = {"dense": 36 * (LINEAR + 4 * SCALES + 2 * NORMS_AND_GATE) + 2 * (2 * EMBED + 4096),
       "expert": EXPERT_PARAMS + 4 * (32 * 32 + 32 * 16),  # gate_up grid [32, 32], down grid [32, 16]
       "vision": 2 * VISION_PARAMS}
assert FP8["dense"] == 4_102_140_928 and FP8["expert"] == 25_171_968

KV_PER_TOKEN = (256 + 64) * 36 * 2
SEQ_KV = KV_PER_TOKEN * CONTEXT
assert (KV_PER_TOKEN, SEQ_KV) == (23_040, 5.625 * GIB)
# activation reserves (docs/OPERATIONS.md): engine: one full-context chunk's keys and values expanded
# per head, plus 64 sequences' fp32 logits; shard: 512 tokens x top-4 rows through H + 3I (+ one
# expert dequantized under FP8); vision: 16 images of (1024/16)^2 patches x (4 Hv + 2 Iv).
ENGINE_RESERVE = CONTEXT * 32 * (128 + 128) * 2 + 64 * 131072 * 4
SHARD_RESERVE = {"bf16": 512 * 4 * (4096 + 3 * 2048) * 2, "fp8": 512 * 4 * (4096 + 3 * 2048) * 2 + 3 * 4096 * 2048 * 2}
VISION_RESERVE = 64 * 64 * (4 * 1024 + 2 * 4096) * 2 * 16


def real_config(directory: Path, fp8: bool) -> Path:
    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    config = Mistral3Config(text_config=Mistral4Config(), vision_config=PixtralVisionConfig(),
                            tie_word_embeddings=False).to_dict()
    config["dtype"] = "bfloat16"
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
            "modules_to_not_convert": ["lm_head", "model.vision_tower", "model.multi_modal_projector"]}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(params=["fp8", "bf16"])
def real(request, tmp_path) -> tuple[str, Path]:
    return request.param, real_config(tmp_path / request.param, request.param == "fp8")


def test_bytes_by_part_and_kv(real):
    kind, model = real
    fp = footprint_of_config(model)
    want = FP8 if kind == "fp8" else BF16
    assert (fp.dense_bytes, fp.bytes_per_expert, fp.vision_bytes) == (want["dense"], want["expert"], want["vision"])
    assert fp.expert_bytes == 36 * 128 * want["expert"]
    assert fp.kv_bytes_per_token == KV_PER_TOKEN
    total = want["dense"] + 36 * 128 * want["expert"] + want["vision"]
    if kind == "fp8":
        assert 112.5 * GIB < total < 113 * GIB  # "about 113 GiB"
    assert fp.total_bytes == total


def test_one_h200_is_refused_two_fit_fp8(tmp_path):
    fp = footprint_of_config(real_config(tmp_path / "m", fp8=True))
    work = Workload(CONTEXT, 4)
    with pytest.raises(LayoutDoesNotFitError) as refused:
        plan_layout(fp, ClusterSpec(1, 1, H200), work)
    need = (FP8["dense"] + 36 * 128 * FP8["expert"] + FP8["vision"] + 4 * SEQ_KV + ENGINE_RESERVE
            + SHARD_RESERVE["fp8"] + VISION_RESERVE)
    assert f"short by {(need - USABLE) / GIB:,.2f} GiB" in str(refused.value)
    assert "KV 22.50 GiB for 4 x 262,144 tokens" in str(refused.value)

    plan = plan_layout(fp, ClusterSpec(1, 2, H200), work)
    assert (plan.transport, plan.num_expert_shards, plan.experts_per_shard, plan.num_engines) == ("ray", 1, 128, 1)
    kv = USABLE - FP8["dense"] - ENGINE_RESERVE  # the engine's GPU, the rest of it
    assert plan.engine_kv_bytes == kv and plan.sequences_per_engine == kv // SEQ_KV == 21
    shard_gpu, engine_gpu = plan.gpus
    assert shard_gpu.used == 36 * 128 * FP8["expert"] + SHARD_RESERVE["fp8"] + FP8["vision"] + VISION_RESERVE
    assert engine_gpu.used == USABLE


def test_batch_64_at_full_context_is_refused_on_two(real):
    kind, model = real
    with pytest.raises(LayoutDoesNotFitError, match=r"KV 360\.00 GiB for 64 x 262,144 tokens"):
        plan_layout(footprint_of_config(model), ClusterSpec(1, 2, H200), Workload(CONTEXT, 64))


def test_bf16_needs_four_h200(tmp_path):
    fp = footprint_of_config(real_config(tmp_path / "m", fp8=False))
    work = Workload(CONTEXT, 4)
    with pytest.raises(LayoutDoesNotFitError) as refused:  # 252 GiB hold it in total, not per GPU
        plan_layout(fp, ClusterSpec(1, 2, H200), work)
    shard = 64 * 36 * BF16["expert"] + SHARD_RESERVE["bf16"]
    engine = BF16["dense"] + 4 * SEQ_KV + ENGINE_RESERVE
    assert f"short by {(engine - (USABLE - shard)) / GIB:,.2f} GiB" in str(refused.value)
    plan = plan_layout(fp, ClusterSpec(1, 4, H200), work)
    assert (plan.num_expert_shards, plan.experts_per_shard, plan.num_engines) == (2, 64, 2)
    assert plan.engine_kv_bytes == USABLE - BF16["dense"] - ENGINE_RESERVE
    assert plan.sequences_per_engine == 20


def test_cli_plan_config_only(real, capsys):
    kind, model = real
    base = ["plan", "--model", str(model), "--config-only", "--nodes", "1", "--gpu-memory", "140GiB",
            "--context", str(CONTEXT), "--batch", "4"]
    assert main([*base, "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "short by" in err[0]
    rc = main([*base, "--gpus-per-node", "2" if kind == "fp8" else "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "23,040 bytes per token" in out and "262,144 tokens = 5.62 GiB" in out
    assert f"each expert {(FP8 if kind == 'fp8' else BF16)['expert']:,} bytes" in out


def test_written_config_is_a_serve_config_that_serve_takes(tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    model = real_config(tmp_path / "m", fp8=True)
    path = tmp_path / "serve.yaml"
    assert main(["plan", "--model", str(model), "--config-only", "--nodes", "2", "--gpus-per-node", "1",
                 "--gpu-memory", "140GiB", "--write-config", str(path)]) == 0
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "deployments.app:app_builder"
    config = load_config(path)  # what `moe-cluster serve --config` reads
    assert (config.transport, config.num_expert_shards, config.model) == ("ray", 1, str(model.resolve()))
    assert config.engine.max_model_len == CONTEXT
    assert config.engine.kv_cache_bytes == USABLE - FP8["dense"] - ENGINE_RESERVE
    # GPU shares asked of Ray: the engine fills its GPU; the vision encoder's 2.30 GiB of 126 GiB -> 0.02
    assert (config.num_engine_replicas, config.engine_num_gpus, config.vision.num_gpus) == (1, 1.0, 0.02)
    # the expert shard asks for its share of its GPU, and the engine computes there in bf16
    shard_bytes = FP8["expert"] * 128 * 36 + SHARD_RESERVE["fp8"]
    assert config.shard_num_gpus == math.ceil(shard_bytes * 100 / USABLE) / 100 > 0.5
    assert (config.engine.device, config.engine.dtype) == ("cuda", "bfloat16")


def test_headers_and_config_only_agree(tiny_ckpt, tmp_path):
    """Bytes from the headers of real files equal those config.json implies, unquantized and FP8."""
    for model in (tiny_ckpt, fp8_header_only(tiny_ckpt, tmp_path / "fp8", [32, 64], "dynamic")):
        headers, config = footprint_of_report(check_model_dir(model)), footprint_of_config(model, "float32")
        assert (headers.dense_bytes, headers.expert_bytes, headers.vision_bytes) == (
            config.dense_bytes, config.expert_bytes, config.vision_bytes)
