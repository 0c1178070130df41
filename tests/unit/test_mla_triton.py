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
