"""MLA decode over the paged latent cache, as a Triton kernel (flash-decoding with split contexts).

One new token per sequence attends in latent space: the query is already absorbed (`[B, h, c+r]`:
the nope part multiplied into the latent by W_UK, then the rotated rope part), each cached token is
one row `[c + r]` of the cache (`c = kv_lora_rank` normed latent, then `r = qk_rope_head_dim` rope
key), and the output is the softmax-weighted sum of the latents `[B, h, c]` (W_UV is applied after).

A program takes one sequence, a block of heads (every head reads the same latent rows, so a block
of heads shares each load) and one split of the context; the splits are merged with their
log-sum-exp in torch. `c` and `r` are compile-time parameters padded to powers of two and masked,
so any rank works (the real model has c = 256, r = 64). Runs under `TRITON_INTERPRET=1` on CPUs,
which is how it is tested here against the torch path.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton is optional: the torch backend needs none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

BLOCK_H = 16  # heads per program (tl.dot needs 16 rows)
BLOCK_N = 32  # context tokens per inner iteration
# Triton 3.9's interpreter multiplies bf16 operands of tl.dot as raw bits: interpreted, the products
# take fp32 operands (the bf16 loads and stores are still the compiled kernel's).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _mla_decode_split(q_ptr, cache_ptr, tables_ptr, lens_ptr, acc_ptr, lse_ptr, scale,
                          num_heads, tokens_per_split,
                          stride_qb, stride_qh, stride_cblock, stride_cslot, stride_tb,
                          stride_ab, stride_ah, stride_as, stride_lb, stride_lh,
                          KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_R: tl.constexpr, PAGE: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
                          DOT_F32: tl.constexpr):
        b = tl.program_id(0)
        hb = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, length)
        heads = hb * BH + tl.arange(0, BH)  # [BH]
        h_ok = heads < num_heads
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c_ok = offs_c < KV_LORA
        r_ok = offs_r < ROPE
        q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q_c = tl.load(q_row + offs_c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # [BH, C]
        q_r = tl.load(q_row + KV_LORA + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, R]
        if DOT_F32:
            q_c = q_c.to(tl.float32)
            q_r = q_r.to(tl.float32)
        m_i = tl.full([BH], float("-inf"), tl.float32)
        l_i = tl.zeros([BH], tl.float32)
        acc = tl.zeros([BH, BLOCK_C], tl.float32)
        for start in range(lo, hi, BN):
            offs_n = start + tl.arange(0, BN)  # [BN] positions in the context
            n_ok = offs_n < hi
            block = tl.load(tables_ptr + b * stride_tb + offs_n // PAGE, mask=n_ok, other=0)
            row = cache_ptr + block.to(tl.int64) * stride_cblock + (offs_n % PAGE) * stride_cslot  # [BN]
            k_c = tl.load(row[:, None] + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)  # [BN, C]
            k_r = tl.load(row[:, None] + KV_LORA + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if DOT_F32:
                k_c = k_c.to(tl.float32)
                k_r = k_r.to(tl.float32)
            s = tl.dot(q_c, tl.trans(k_c)) + tl.dot(q_r, tl.trans(k_r))  # [BH, BN] fp32
            s = tl.where(n_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a split past the sequence's end: zeros
        a_row = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as
        tl.store(a_row + offs_c[None, :], out, mask=h_ok[:, None] & c_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, m_i + tl.log(l_i), mask=h_ok)


def mla_decode(query: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               scale: float, kv_lora_rank: int, num_splits: int | None = None,
               longest: int | None = None) -> torch.Tensor:
    """query [B, h, c+r] (absorbed), cache [NB, page, c+r], block_tables [B, W] and context_lens [B]
    (every length >= 1) -> the attended latents [B, h, c] in the query's dtype. `longest` is
    max(context_lens) where the caller knows it (saves a device sync), or any bound above it: the
    splits follow it alone (with the batch size), so a decode CUDA graph passes max_model_len and
    its kernel's shape is fixed; splits past a sequence's length are empty."""
    if triton is None:
        raise RuntimeError("the triton attention backend needs the `triton` package")
    b, heads, width = query.shape
    rope = width - kv_lora_rank
    page = cache.shape[1]
    longest = int(context_lens.max()) if longest is None else longest
    if num_splits is None:  # enough programs to fill the device at small batches, none empty
        num_splits = max(1, min(math.ceil(longest / 256), 64 // max(b, 1) or 1))
    tokens_per_split = math.ceil(math.ceil(longest / num_splits) / BLOCK_N) * BLOCK_N
    num_splits = math.ceil(longest / tokens_per_split)
    acc = torch.zeros(b, heads, num_splits, kv_lora_rank, dtype=torch.float32, device=query.device)
    lse = torch.full((b, heads, num_splits), float("-inf"), dtype=torch.float32, device=query.device)
    q = query.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    grid = (b, triton.cdiv(heads, BLOCK_H), num_splits)
    _mla_decode_split[grid](
        q, cache, tables, lens, acc, lse, scale, heads, tokens_per_split,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), lse.stride(0), lse.stride(1),
        KV_LORA=kv_lora_rank, ROPE=rope, BLOCK_C=triton.next_power_of_2(kv_lora_rank),
        BLOCK_R=triton.next_power_of_2(max(rope, 1)), PAGE=page, BH=BLOCK_H, BN=BLOCK_N,
        DOT_F32=_INTERPRETED or query.dtype == torch.float32)
    # Merge the splits: a split past a sequence's end has lse -inf and weighs nothing.
    weights = torch.softmax(lse, dim=-1)  # [B, h, S]
    return (acc * weights[..., None]).sum(2).to(query.dtype)  # [B, h, c]
