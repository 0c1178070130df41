"""Device and dtype: what EngineConfig resolves them to (CUDA + bfloat16 where CUDA is visible, CPU +
float32 elsewhere), bfloat16 on the CPU through the same code, the serving config's engine keys,
and random weights from config.json alone (`load_format="dummy"`), without mistral-common."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.engine.engine_config import EngineConfig
from cluster.engine.sampling_params import SamplingParams
from cluster.errors import ConfigError
from cluster.llm import LLM
from cluster.model import mla_triton

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def test_defaults_follow_what_the_host_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = EngineConfig()
    assert (config.resolved_device().type, config.torch_dtype) == ("cpu", torch.float32)
    assert config.resolved_attention_backend() == "torch" and not config.uses_cuda_graphs()
    assert EngineConfig(dtype="bfloat16").torch_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="no CUDA device"):
        EngineConfig(device="cuda").resolved_device()
    # A head node without GPUs plans for engines that will have them: no refusal, the GPU's measure decides.
    cuda = EngineConfig(device="cuda")
    assert cuda.device_type() == "cuda" and cuda.torch_dtype == torch.bfloat16
    from cluster.engine.kv_pool import limits_before_start
    from cluster.model.config import parse_text_config
    from cluster.testing.presets import get_preset

    assert limits_before_start(cuda, parse_text_config(get_preset("tiny").text)) is None
    with pytest.raises(ConfigError, match="not a torch device"):
        EngineConfig(device="tpu:x").torch_dtype  # noqa: B018
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = EngineConfig()
    assert (str(config.resolved_device()), config.torch_dtype) == ("cuda", torch.bfloat16)
    assert config.resolved_attention_backend() == ("triton" if mla_triton.available() else "torch")
    assert config.uses_cuda_graphs() and not config.uses_cuda_graphs("ray")
    assert not EngineConfig(enforce_eager=True).uses_cuda_graphs()
    assert EngineConfig(device="cpu").torch_dtype == torch.float32 and not EngineConfig(device="cpu").uses_cuda_graphs()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="load_format"):
        EngineConfig(load_format="pt")
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="float64")
    with pytest.raises(ConfigError, match="attention backend"):
        LLM(None, num_kv_blocks=8, attention_backend="flash")


def test_serving_config_carries_device_and_dtype() -> None:
    from deployments.config import parse_config

    config = parse_config({"engine": {"device": "cpu", "dtype": "bfloat16", "attention_backend": "torch",
                                      "enforce_eager": True, "load_format": "dummy"}})
    engine = config.engine.to_engine_config()
    assert (engine.device, engine.torch_dtype, engine.attention_backend, engine.enforce_eager, engine.load_format) \
        == ("cpu", torch.bfloat16, "torch", True, "dummy")


def test_bfloat16_on_the_cpu_places_everything_in_bfloat16(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, num_kv_blocks=16, dtype="bfloat16")
    engine = llm.engine
    assert engine is not None
    assert engine.runner.dtype == torch.bfloat16 and engine.caches[0].dtype == torch.bfloat16
    shard = engine.dispatcher.shards[0]  # type: ignore[attr-defined]
    assert {e.gate_up_proj.dtype for e in shard.experts.values()} == {torch.bfloat16}
    out = llm.generate([[1, 5, 9, 22]], GREEDY, use_tqdm=False)
    assert len(out[0].token_ids) == GREEDY.max_tokens


def _config_only(src: Path, dst: Path, **changes: object) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    raw = json.loads((src / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_dummy_weights_need_config_json_alone(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = _config_only(tiny_ckpt, tmp_path / "dummy")
    llm = LLM(model, num_kv_blocks=16, load_format="dummy", dtype="bfloat16")
    assert llm.tokenizer is None and llm.engine is not None
    logits_seen: list[torch.Tensor] = []
    real = llm.engine.runner.forward
    llm.engine.runner.forward = lambda inputs: logits_seen.append(real(inputs)) or logits_seen[-1]  # type: ignore
    out = llm.generate([[1, 5, 9, 22], [1, 7]], GREEDY, use_tqdm=False)
    assert [len(o.token_ids) for o in out] == [GREEDY.max_tokens] * 2
    logits = torch.cat([x.float() for x in logits_seen])
    assert torch.isfinite(logits).all() and logits.std() > 0.01  # random but of ordinary size
    shard = llm.engine.dispatcher.shards[0]  # type: ignore[attr-defined]
    assert shard.reads == [] and {e.gate_up_proj.dtype for e in shard.experts.values()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="transport 'local'"):
        LLM(model, load_format="dummy", transport="ray", num_expert_shards=1)


def test_dummy_fp8_experts_stay_fp8(tiny_ckpt: Path, tmp_path: Path) -> None:
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    model = _config_only(tiny_ckpt, tmp_path / "dummy_fp8", quantization_config=quant)
    llm = LLM(model, num_kv_blocks=16, load_format="dummy", dtype="bfloat16")
    assert llm.engine is not None
    layer = llm.engine.dispatcher.shards[0].experts[0]  # type: ignore[attr-defined]
    assert layer.fp8 is not None and layer.fp8[0].weight.dtype == torch.float8_e4m3fn
    dequantized = layer.fp8[0].dequantize(0, torch.float32)
    assert torch.isfinite(dequantized).all() and 0.5 * 0.08 < dequantized.std() < 2 * 0.08  # initializer_range
    out = llm.generate([[1, 5, 9, 22]], GREEDY, use_tqdm=False)
    assert len(out[0].token_ids) == GREEDY.max_tokens


def test_dummy_runs_without_mistral_common(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The GPU check machine has no mistral-common: token-id prompts on dummy weights still run."""
    model = _config_only(tiny_ckpt, tmp_path / "no_mc")
    code = f"""
import sys
sys.modules["mistral_common"] = None  # any import of it fails
from cluster.llm import LLM
from cluster.engine.sampling_params import SamplingParams
llm = LLM({str(model)!r}, num_kv_blocks=8, load_format="dummy")
print(len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0].token_ids))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "3"


@pytest.mark.gpu
def test_cuda_decode_step_forward_and_sampling_do_not_sync(tiny_ckpt: Path) -> None:
    """On CUDA, eagerly: torch's sync debug mode refuses any synchronizing call in a decode step's
    forward and greedy sampling (the tokens' read back comes after)."""
    from cluster.engine.sampler import sample

    llm = LLM(tiny_ckpt, num_kv_blocks=64, device="cuda", dtype="bfloat16", enforce_eager=True)
    assert llm.engine is not None
    runner = llm.engine.runner
    assert runner.caches[0].is_cuda and runner.model.lm_head.weight.dtype == torch.bfloat16
    checked: list[int] = []
    real = runner.forward

    def strict(inputs):  # noqa: ANN001, ANN202
        if inputs.meta.spans or inputs.meta.decode is None:
            return real(inputs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = real(inputs)
            tokens = sample(logits, [GREEDY] * logits.shape[0], [None] * logits.shape[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(int(tokens.shape[0]))
        return logits

    runner.forward = strict  # type: ignore[method-assign]
    llm.generate([[1, 5, 9], [1, 7, 8, 9, 10]], GREEDY, use_tqdm=False)
    assert checked


@pytest.mark.gpu
def test_dummy_weights_on_cuda_in_bf16_and_fp8(tiny_ckpt: Path, tmp_path: Path) -> None:
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    for name, changes in (("bf16", {}), ("fp8", {"quantization_config": quant})):
        model = _config_only(tiny_ckpt, tmp_path / name, **changes)
        llm = LLM(model, num_kv_blocks=64, load_format="dummy", device="cuda", dtype="bfloat16")
        assert llm.engine is not None and llm.engine.runner.graphs is not None
        out = llm.generate([[1, 5, 9, 22]] * 3, GREEDY, use_tqdm=False)
        assert [len(o.token_ids) for o in out] == [GREEDY.max_tokens] * 3
        layer = llm.engine.dispatcher.shards[0].experts[0]  # type: ignore[attr-defined]
        weight = layer.fp8[0].weight if layer.fp8 is not None else layer.gate_up_proj
        assert weight.is_cuda and weight.dtype == (torch.float8_e4m3fn if changes else torch.bfloat16)
