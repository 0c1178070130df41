"""Expert parallelism over DeepSpeed: an engine actor and N shard actors on distinct Ray nodes
give the same greedy tokens as the in-process engine and transformers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import ray

from cluster import LLM, SamplingParams
from cluster.experts.placement import ExpertPlacement
from cluster.model.checkpoint import CheckpointReader
from tests.reference import assert_matches_reference, reference_greedy

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(42)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(n)] for n in (4, 19, 57, 120, 33)]


@pytest.fixture(scope="module")
def local_tokens(tiny_ckpt: Path, prompts) -> list[tuple[int, ...]]:
    return [o.token_ids for o in LLM(tiny_ckpt).generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("num_shards", [2, 4])
def test_deepspeed_group_matches_local_and_reference(expert_nodes, tiny_ckpt: Path, prompts, local_tokens,
                                                      num_shards: int) -> None:
    llm = LLM(tiny_ckpt, transport="deepspeed", num_expert_shards=num_shards, max_num_batched_tokens=64)
    try:
        group = llm.group
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            assert out.token_ids == local_tokens[i], f"request {i}: deepspeed differs from LocalDispatcher"
            assert_matches_reference(out.token_ids, reference_greedy(tiny_ckpt, prompt, NEW_TOKENS), f"#{i}")

        # Shards sit on distinct nodes, none on the engine's... node of the head is allowed.
        nodes = ray.get([s.node_id.remote() for s in group.shards])
        assert len(set(nodes)) == num_shards

        # Memory: the engine holds no routed expert; each shard exactly its placement's experts.
        engine_params = ray.get(group.engine.held.remote())
        assert not any(".experts." in n for n in engine_params)
        reader = CheckpointReader(tiny_ckpt)
        text = reader.config.text
        placement = ExpertPlacement.of_model(text, num_shards)
        per_expert = 3 * text.hidden_size * text.moe_intermediate_size
        for rank, shard in enumerate(group.shards):
            held = ray.get(shard.held.remote())
            for layer in text.moe_layers:
                mine = placement.experts_of(rank, layer)
                names = [n for n in held if n.startswith(f"layers.{layer}.experts[")]
                assert names and all(f"[{','.join(map(str, mine))}]" in n for n in names)
                assert sum(held[n] for n in names) == len(mine) * per_expert
            reads = ray.get(shard.reads.remote())
            assert reads and all(".mlp.experts." in r for r in reads), "a shard read a non-expert tensor"
            first, last = placement.experts_of(rank, text.moe_layers[0])[0], placement.experts_of(
                rank, text.moe_layers[0])[-1]
            assert any(r.endswith(f"[{first}:{last + 1}]") for r in reads)

        # Token counts per (layer, expert) over shards sum to the pairs the engine sent.
        sent = ray.get(group.engine.pairs_sent.remote())
        counts = [ray.get(s.token_counts.remote()) for s in group.shards]
        for layer in text.moe_layers:
            assert sum(int(c[layer].sum()) for c in counts) == sent[layer] > 0
        # ... and the engine's own per-expert view (what its metrics export) equals the shards'.
        routed = ray.get(group.engine.token_counts.remote())
        for layer in text.moe_layers:
            assert routed[layer].tolist() == sum(c[layer] for c in counts).tolist()
        free, total = ray.get(group.engine.check_integrity.remote())
        assert free == total
    finally:
        llm.close()


def test_local_shards_split_by_placement(tiny_ckpt: Path, prompts, local_tokens) -> None:
    llm = LLM(tiny_ckpt, num_expert_shards=3)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == local_tokens
    counts = llm.engine.dispatcher.token_counts()
    assert all(int(c.sum()) > 0 for c in counts.values())


def test_redundant_copies_spread_tokens(tiny_ckpt: Path) -> None:
    base = ExpertPlacement.contiguous([0, 1], 16, 2)
    placement = base.with_copies(0, 3, [1])
    import torch

    ids = torch.tensor([[3, 9]] * 6)
    owner = placement.assign(0, ids)
    assert owner[:, 0].tolist() == [0, 1, 0, 1, 0, 1]  # expert 3: copies on ranks 0 and 1
    assert owner[:, 1].tolist() == [1] * 6
    placement.check_integrity()
    with pytest.raises(RuntimeError):
        ExpertPlacement(2, 2, {0: ((0,), ())}).check_integrity()
