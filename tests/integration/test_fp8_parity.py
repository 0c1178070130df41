"""FP8 checkpoints (both forms of transformers' quant_method "fp8", both expert layouts) give the
greedy tokens of transformers run in fp32 on the dequantized weights: in one process, over
in-process shards, and over 2 expert shards on each distributed transport. The checkpoints are
quantized by the tests' own code (tests/fp8_reference.py), not by the writer."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
from safetensors import safe_open

from cluster import LLM, SamplingParams
from cluster.experts.placement import ExpertPlacement
from cluster.model.checkpoint import CheckpointReader
from tests.fp8_reference import I_MOE, SKIPPED_TENSOR, H, make_fp8_pair
from tests.reference import assert_matches_reference, reference_greedy

NEW_TOKENS = 20
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
CASES = {  # name: (form, expert layout, block)
    "block32x64_fused": ("block", "fused", (32, 64)),
    "block32x64_per_expert": ("block", "per_expert", (32, 64)),
    "static_fused": ("static", "fused", None),
    "static_per_expert": ("static", "per_expert", None),
    "block128_fused": ("block", "fused", (128, 128)),
}


@pytest.fixture(scope="module")
def pairs(ckpt_root: Path) -> Callable[[str], tuple[Path, Path]]:
    def make(case: str) -> tuple[Path, Path]:
        form, layout, block = CASES[case]
        return make_fp8_pair(ckpt_root, case, form, layout, block, seed=3)
    return make


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(8)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(n)] for n in (3, 17, 60, 31)]


def _check(outs: list, ref_dir: Path, prompts: list[list[int]], what: str) -> None:
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        assert_matches_reference(out.token_ids, reference_greedy(ref_dir, prompt, NEW_TOKENS), f"{what} #{i}")


@pytest.mark.parametrize("case", ["block32x64_fused", "block32x64_per_expert"])
def test_small_block_grids_have_partial_edges_everywhere(pairs, case: str) -> None:
    fp8_dir, _ = pairs(case)
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        grids = {n: f.get_slice(n).get_shape() for n in f.keys() if n.endswith("_scale_inv")}
        weights = {n: f.get_slice(n).get_shape() for n in f.keys()
                   if f.get_slice(n).get_dtype() == "F8_E4M3"}
        assert f.get_slice(SKIPPED_TENSOR).get_dtype() == "F32"  # modules_to_not_convert
        assert SKIPPED_TENSOR.replace(".weight", ".weight_scale_inv") not in grids
    assert len(grids) == len(weights) > 10
    for name, (rows, cols) in ((n, s[-2:]) for n, s in weights.items()):
        assert rows % 32 and cols % 64, f"{name} [{rows}, {cols}] has no partial edge block"
        assert math.ceil(rows / 32) >= 3 and math.ceil(cols / 64) >= 3, name
    if case.endswith("fused"):
        # read over the fused [2I, H] matrix: ceil(2I / 32) rows, one fewer than a gate and an up grid stacked
        assert grids["language_model.model.layers.1.mlp.experts.gate_up_proj_scale_inv"][1:] == [
            math.ceil(2 * I_MOE / 32), math.ceil(H / 64)] != [2 * math.ceil(I_MOE / 32), math.ceil(H / 64)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_matches_transformers_on_the_dequantized_weights(pairs, prompts, case: str) -> None:
    fp8_dir, ref_dir = pairs(case)
    llm = LLM(fp8_dir, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(outs, ref_dir, prompts, case)
    llm.engine.check_integrity()
    shards = LLM(fp8_dir, num_expert_shards=2, expert_cache_bytes=1 << 20)
    assert [o.token_ids for o in shards.generate(prompts, GREEDY, use_tqdm=False)] == [o.token_ids for o in outs]
    for shard in shards.engine.dispatcher.shards:
        assert shard.cache is not None and shard.cache.nbytes > 0
        shard.cache.check_integrity()


# Each transport sees both forms and both layouts; one group per (transport, checkpoint).
DISTRIBUTED = [("deepspeed", "block32x64_fused"), ("deepspeed", "static_per_expert"),
               ("ray", "block32x64_per_expert"), ("ray", "static_fused")]


def test_fp8_over_two_expert_shards_on_each_transport(expert_nodes, pairs, prompts) -> None:
    for transport, case in DISTRIBUTED:
        fp8_dir, ref_dir = pairs(case)
        local = [o.token_ids for o in LLM(fp8_dir).generate(prompts, GREEDY, use_tqdm=False)]
        llm = LLM(fp8_dir, transport=transport, num_expert_shards=2, max_num_batched_tokens=64)
        try:
            outs = llm.generate(prompts, GREEDY, use_tqdm=False)
            assert [o.token_ids for o in outs] == local, f"{transport}/{case}: differs from the local engine"
            _check(outs, ref_dir, prompts, f"{transport}/{case}")
            text = CheckpointReader(fp8_dir).config.text
            placement = ExpertPlacement.of_model(text, 2)
            for rank, shard in enumerate(llm.group.shards):
                mine = {layer: placement.experts_of(rank, layer) for layer in text.moe_layers}
                fp32_bytes = sum(len(ids) for ids in mine.values()) * 3 * H * I_MOE * 4
                assert ray.get(shard.resident_bytes.remote()) <= 0.30 * fp32_bytes, f"{transport}/{case} #{rank}"
                reads = ray.get(shard.reads.remote())
                # only its experts' weights and scales: no dense tensor, no other expert, no activation scale
                assert reads and all(".mlp.experts." in r and "activation_scale" not in r for r in reads)
                if case.endswith("per_expert"):
                    read_ids = {(int(r.split(".layers.")[1].split(".")[0]), int(r.split(".experts.")[1].split(".")[0]))
                                for r in reads}
                    assert read_ids == {(layer, e) for layer, ids in mine.items() for e in ids}
                else:
                    first, last = mine[text.moe_layers[0]][0], mine[text.moe_layers[0]][-1]
                    assert any(r.endswith(f"gate_up_proj_scale_inv[{first}:{last + 1}]") for r in reads)
        finally:
            llm.close()
