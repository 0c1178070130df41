"""Checkpoint reading: layouts, partial loads, refusals; the generator's presets and scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.errors import CheckpointError, ConfigError, ScriptError
from cluster.experts.dispatchers import transport_factory
from cluster.model.checkpoint import CheckpointReader
from cluster.model.config import TextConfig, load_model_config, parse_text_config
from cluster.model.routed_experts import RoutedExperts
from cluster.model.text_model import Mistral4TextModel
from cluster.testing.checkpoint_writer import script_successors
from cluster.testing.presets import PRESETS


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_partial_load_reads_only_assigned_experts(make_ckpt, layout: str) -> None:
    ckpt = make_ckpt(f"partial_{layout}", preset="tiny", seed=7, expert_layout=layout,
                     num_files=2 if layout == "per_expert" else 1)
    reader = CheckpointReader(ckpt)
    gate_up, down = reader.read_experts(1, [3, 4, 9])
    text = reader.config.text
    assert gate_up.shape == (3, 2 * text.moe_intermediate_size, text.hidden_size)
    assert down.shape == (3, text.hidden_size, text.moe_intermediate_size)
    expert_reads = [r for r in reader.reads if ".experts." in r]
    if layout == "fused":
        assert expert_reads == [
            f"{reader.text_prefix}layers.1.mlp.experts.gate_up_proj[3:5]",
            f"{reader.text_prefix}layers.1.mlp.experts.gate_up_proj[9:10]",
            f"{reader.text_prefix}layers.1.mlp.experts.down_proj[3:5]",
            f"{reader.text_prefix}layers.1.mlp.experts.down_proj[9:10]",
        ]
    else:
        experts_read = {int(r.split(".experts.")[1].split(".")[0]) for r in expert_reads}
        assert experts_read == {3, 4, 9}
        assert all(".layers.1." in r for r in expert_reads)
    # The sliced rows equal the same experts read as part of the whole layer.
    full_up, full_down = CheckpointReader(ckpt).read_experts(1, list(range(text.n_routed_experts)))
    assert torch.equal(gate_up, full_up[[3, 4, 9]]) and torch.equal(down, full_down[[3, 4, 9]])


def test_dense_part_holds_no_routed_expert(tiny_ckpt: Path) -> None:
    reader = CheckpointReader(tiny_ckpt)
    model = Mistral4TextModel.from_reader(reader)
    assert not any(".experts." in r and "shared" not in r for r in reader.reads)
    assert not any(".experts." in n for n, _ in model.named_parameters())
    assert not any(isinstance(m, RoutedExperts) for m in model.modules())


def test_bare_mistral4_config(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg["text_config"]))
    mc = load_model_config(tmp_path)
    assert mc.model_type == "mistral4" and mc.vision is None
    assert mc.text.n_routed_experts == cfg["text_config"]["n_routed_experts"]


@pytest.mark.parametrize("change, field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 2}, "topk_group"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
])
def test_invalid_text_config_names_the_field(tiny_ckpt: Path, change: dict, field: str) -> None:
    cfg = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    with pytest.raises(ConfigError, match=field):
        parse_text_config({**cfg, **change})


def test_missing_files_are_clear_errors(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_model_config(tmp_path)
    shutil.copy(tiny_ckpt / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="safetensors"):
        CheckpointReader(tmp_path)


def test_unknown_transport_fails_loudly() -> None:
    with pytest.raises(ConfigError, match="unknown transport 'carrier-pigeon'"):
        transport_factory("carrier-pigeon")


def test_presets_meet_their_promises() -> None:
    tiny = parse_text_config(PRESETS["tiny"].text)
    rope = PRESETS["tiny"].text["rope_parameters"]
    assert rope["original_max_position_embeddings"] <= 512
    bench = parse_text_config(PRESETS["bench"].text)
    assert bench.n_routed_experts >= 16 and bench.num_experts_per_tok == 4
    assert _routed_flops_share(bench) >= 0.5
    n_params = _param_count(bench)
    assert n_params * 4 <= 4 * 10**9
    assert tiny.vocab_size == bench.vocab_size == 131072


def test_long_preset_reaches_256k_positions_by_yarn() -> None:
    # transformers' reading of the config: a 262,144-token prompt and room for its answer, by YaRN
    long = parse_text_config(PRESETS["long"].text)
    rope = long.hf_config().rope_parameters
    assert 262_144 < long.max_position_embeddings <= 262_144 + 1024
    assert rope["rope_type"] == "yarn" and rope["factor"] >= 512
    assert rope["original_max_position_embeddings"] * rope["factor"] == long.max_position_embeddings
    assert long.num_hidden_layers == 1 and long.num_attention_heads == 1


def _param_count(text) -> int:
    # Independent of the engine: build the reference model on the meta device and count.
    from transformers import Mistral4Config, Mistral4ForCausalLM

    with torch.device("meta"):
        model = Mistral4ForCausalLM(Mistral4Config.from_dict(dict(text.raw)))
    return sum(p.numel() for p in model.parameters())


def test_script_rules() -> None:
    assert script_successors([5, 6, 7], 100) == {5: 6, 6: 7, 7: 2}
    with pytest.raises(ScriptError, match="followed by"):
        script_successors([5, 6, 5, 7], 100)
    with pytest.raises(ScriptError, match="followed by"):
        script_successors([5, 6, 5, 6], 100)  # 6 is followed by 5, then by end-of-sequence
    with pytest.raises(ScriptError, match="end-of-sequence"):
        script_successors([5, 2], 100)
    with pytest.raises(ScriptError, match="outside the vocabulary"):
        script_successors([5, 100], 100)


def test_scripted_checkpoint_emits_its_script(make_ckpt) -> None:
    script = [25, 1784, 1500, 26, 1049, 3000, 9, 2000, 20, 1123, 1034, 1125]  # [THINK] .. [/THINK] .. [TOOL_CALLS]
    ckpt = make_ckpt("scripted", preset="tiny", seed=3, script=script)
    llm = LLM(ckpt)
    prompts = ["Hello", [1, 3, 4, 5, 6, 7], "A longer prompt, with punctuation and more words in it."]
    for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False):
        assert list(out.token_ids) == script + [2]
        assert out.finish_reason == "stop"
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_coalescer_merges_concurrent_calls_for_a_layer(tiny_ckpt: Path) -> None:
    import threading

    from cluster.experts.placement import ExpertPlacement
    from cluster.experts.shard import ExpertShard
    from cluster.experts.transport_ray import Coalescer

    reader = CheckpointReader(tiny_ckpt)
    text = reader.config.text
    placement = ExpertPlacement.of_model(text, 1)
    shard = ExpertShard(reader, placement, 0)
    coalescer = Coalescer(shard, window_s=0.3)
    layer = text.moe_layers[0]
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(n, text.hidden_size, generator=gen), torch.randint(0, 16, (n, 4), generator=gen),
               torch.rand(n, 4, generator=gen)) for n in (3, 5)]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: coalescer.compute(layer, *inputs[i])}))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (coalescer.calls, coalescer.batches) == (2, 1)
    for i, (h, ids, w) in enumerate(inputs):
        torch.testing.assert_close(results[i], shard.compute(layer, h, ids, w))


def _routed_flops_share(text: TextConfig) -> float:
    """Share of per-token matmul FLOPs spent in routed experts, lm_head included (attention
    over the context excluded: it depends on the context length)."""
    h = text.hidden_size
    heads = text.num_attention_heads
    q = (h * text.q_lora_rank + text.q_lora_rank * heads * text.qk_head_dim
         if text.q_lora_rank else h * heads * text.qk_head_dim)
    attn = q + h * text.latent_dim + text.kv_lora_rank * heads * (text.qk_nope_head_dim + text.v_head_dim)
    attn += heads * text.v_head_dim * h
    routed = shared = dense = 0
    for layer in range(text.num_hidden_layers):
        if text.is_moe_layer(layer):
            routed += 3 * h * text.moe_intermediate_size * text.num_experts_per_tok
            shared += 3 * h * text.moe_intermediate_size * text.n_shared_experts + h * text.n_routed_experts
        else:
            dense += 3 * h * text.intermediate_size
    total = attn * text.num_hidden_layers + routed + shared + dense + h * text.vocab_size
    return routed / total if total else 0.0
