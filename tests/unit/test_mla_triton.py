"""The Triton MLA decode kernel, run by Triton's interpreter on CPUs, against a plain softmax over
each sequence's gathered latents: the real model's ranks (256 + 64), odd ones, splits of the
context, pages out of order, and a one-token context."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton", reason="triton is in the test extra; CI installs it")


@pytest.fixture(scope="module")
def kernel() -> ModuleType:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("tests/conftest.py sets TRITON_INTERPRET=1 without CUDA")
    import cluster.model.mla_triton as module

    return module


def _reference(query: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
               scale: float, rank: int) -> torch.Tensor:
    page = cache.shape[1]
    out = []
    for b in range(query.shape[0]):
        pos = torch.arange(int(lens[b]))
        ctx = cache[tables[b][pos // page], pos % page].double()  # [L, c+r]
        probs = (query[b].double() @ ctx.T * scale).softmax(-1)  # [h, L]
        out.append(probs @ ctx[:, :rank])
    return torch.stack(out)  # [B, h, c]


@pytest.mark.parametrize(("rank", "rope", "heads", "page"), [(256, 64, 4, 16), (24, 8, 2, 16), (40, 12, 20, 8)])
def test_kernel_matches_the_softmax_over_gathered_latents(kernel: ModuleType, rank: int, rope: int, heads: int,
                                                          page: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    cache = torch.randn(48, page, rank + rope, generator=gen)  # [NB, page, c+r]
    lens = torch.tensor([1, 37, 150, 64])
    width = (int(lens.max()) + page - 1) // page
    tables = torch.stack([torch.randperm(48, generator=gen)[:width] for _ in lens])  # pages out of order
    query = torch.randn(len(lens), heads, rank + rope, generator=gen)
    want = _reference(query, cache, tables, lens, 0.07, rank)
    for splits in (None, 1, 3):
        got = kernel.mla_decode(query, cache, tables, lens, 0.07, rank, num_splits=splits)
        assert got.shape == (len(lens), heads, rank)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_kernel_in_bfloat16_stays_within_bf16_noise(kernel: ModuleType) -> None:
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(8, 16, 256 + 64, generator=gen)
    tables = torch.arange(8)[None, :]
    lens = torch.tensor([120])
    query = torch.randn(1, 4, 320, generator=gen) * 0.1
    got = kernel.mla_decode(query.bfloat16(), cache.bfloat16(), tables, lens, 0.07, 256)
    assert got.dtype == torch.bfloat16
    want = _reference(query.bfloat16().float(), cache.bfloat16().float(), tables, lens, 0.07, 256)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_triton_backend_in_mla_matches_expanded_attention(kernel: ModuleType) -> None:
    """The `triton` backend inside MLA (decodes through the kernel, chunks through torch) against
    expanded-K/V causal SDPA, over steps that mix chunks and decodes on out-of-order pages."""
    from cluster.model.attention import MLAAttention, make_attention_backend
    from cluster.model.config import parse_text_config
    from cluster.model.layers import Rope
    from cluster.model.triton_attention import TritonAttention
    from cluster.testing.presets import get_preset
    from tests.unit.test_attention_backends import _seqs, reference, run_steps

    text = parse_text_config(get_preset("tiny").text)
    backend = make_attention_backend("triton")
    assert isinstance(backend, TritonAttention)
    torch.manual_seed(0)
    layer = MLAAttention(text, Rope(text), backend)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    layer = layer.eval().requires_grad_(False)
    seqs = _seqs(text, [71, 11, 3], seed=5)
    steps = [[(0, 40), (1, 9), (2, 1)], [(2, 1), (0, 30), (1, 1)], [(0, 1), (1, 1), (2, 1)]]
    calls: list[int] = []
    real = kernel.mla_decode

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    kernel.mla_decode = counting
    try:
        got = run_steps(layer, seqs, steps)
    finally:
        kernel.mla_decode = real
    assert len(calls) == 3  # each step's decodes went through the kernel
    for s, out in zip(seqs, got, strict=True):
        torch.testing.assert_close(out, reference(layer, s.x[:s.done]), rtol=1e-4, atol=1e-5)
