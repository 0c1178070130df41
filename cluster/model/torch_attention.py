"""The "torch" attention backend: latent-space attention over the paged cache in plain torch ops.

Prefill after a sequence's first chunk: the chunk's absorbed queries attend to the whole context's
cached latents as one matrix product per row block (heads folded into rows: every head reads the
same latent keys), so a chunk costs chunk x context and the context is never expanded per head. Row
blocks bound the fp32 scores held at once, whatever the context length. (A first chunk attends to
itself alone, per head: the base class's `prefill_fresh`.)

Decode: every sequence's context is cut into partitions of whole blocks; partitions of all
sequences are attended together (one batched product, padding only inside each sequence's last
partition) and each sequence's partitions are merged by their softmax maxima and sums (split-K).
The cost follows the sum of the context lengths, not batch x longest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.model.attention_backend import AttentionBackend, DecodeBatch, SeqSpan

SCORE_BYTES = 64 * 2**20  # fp32 prefill scores held at once (a row block of queries x the context)
PARTITION_TOKENS = 512  # decode context per partition (rounded to whole blocks)
PADDING_TOLERATED = 1.5  # decode pads to the longest context while that costs at most this x the sum


@dataclass(frozen=True)
class DecodePlan:
    """Where a decode batch's partitions read. `owner` None: one partition per sequence, in order."""

    owner: torch.Tensor | None  # [N] the batch row of each partition
    blocks: torch.Tensor  # [N, k] cache blocks of each partition, in context order
    valid: torch.Tensor  # [N, 1, k * block_size] bool, False past the sequence's length
    cell: torch.Tensor | None  # [N] owner * most partitions + partition index: a dense [B, P] layout
    members: torch.Tensor | None  # [B, N] fp32 one-hot: sums over each sequence's partitions as a product
    most: int  # P, the most partitions of one sequence


def plan_decode(batch: DecodeBatch, block_size: int) -> DecodePlan:
    """Partitions of `PARTITION_TOKENS` (whole blocks); one per sequence, as wide as the longest
    context, when every context fits one or padding them all to the longest costs little."""
    lens, tables = batch.context_lens, batch.block_tables  # [B], [B, W]
    b = lens.shape[0]
    longest_blocks = -(-batch.longest // block_size)
    per_part = max(1, PARTITION_TOKENS // block_size)
    padded = b * longest_blocks * block_size
    total = batch.total if batch.total is not None else int(lens.sum())  # the host's: no device read
    if longest_blocks <= per_part or padded <= PADDING_TOLERATED * total:
        span = torch.arange(longest_blocks * block_size, device=lens.device)
        return DecodePlan(None, tables[:, :longest_blocks], (span[None, :] < lens[:, None])[:, None, :], None, None,
                          1)
    width = per_part * block_size
    parts = (lens + width - 1) // width  # [B] partitions of each sequence
    max_parts = -(-longest_blocks // per_part)
    if tables.shape[1] < max_parts * per_part:
        tables = torch.nn.functional.pad(tables, (0, max_parts * per_part - tables.shape[1]))
    tables = tables[:, :max_parts * per_part].reshape(b, max_parts, per_part)  # [B, P, k]
    owner = torch.repeat_interleave(torch.arange(b, device=lens.device), parts)  # [N]
    first = torch.cumsum(parts, 0) - parts  # [B] first partition of each sequence
    index = torch.arange(owner.shape[0], device=lens.device) - first[owner]  # [N] partition within its sequence
    offsets = index[:, None] * width + torch.arange(width, device=lens.device)  # [N, width]
    members = (owner[None, :] == torch.arange(b, device=lens.device)[:, None]).float()  # [B, N]
    return DecodePlan(owner, tables[owner, index], (offsets < lens[owner][:, None])[:, None, :],
                      owner * max_parts + index, members, max_parts)


class TorchAttention(AttentionBackend):
    def __init__(self) -> None:
        # The plan of the last decode batch seen: every layer of a step attends the same batch.
        self._plan: tuple[DecodeBatch, DecodePlan] | None = None

    def prefill(self, query: torch.Tensor, cache: torch.Tensor, span: SeqSpan, kv_lora_rank: int,
                scale: float) -> torch.Tensor:
        n, heads, width = query.shape
        block_size = cache.shape[1]
        length = span.context_len
        blocks = span.block_table[:-(-length // block_size)]
        slots = (blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)).view(-1)[:length]
        ctx = cache.view(-1, width)[slots]  # [L, c+r]
        values = ctx[:, :kv_lora_rank]  # [L, c]
        prior = length - n  # context before the chunk: visible to every row
        q = query * scale  # [n, h, c+r]
        out = torch.empty(n, heads, kv_lora_rank, dtype=query.dtype, device=query.device)
        step = max(1, min(n, SCORE_BYTES // (4 * heads * length)))
        own = torch.arange(n, device=query.device)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            scores = (q[lo:hi].reshape(-1, width) @ ctx.T).view(hi - lo, heads, length)  # [t, h, L]
            future = own[None, :] > own[lo:hi, None]  # [t, n] the chunk's keys after each row
            scores[..., prior:].masked_fill_(future[:, None, :], float("-inf"))
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)  # [t, h, L]
            out[lo:hi] = (probs.view(-1, length) @ values).view(hi - lo, heads, kv_lora_rank)
        return out

    def decode(self, query: torch.Tensor, cache: torch.Tensor, batch: DecodeBatch, kv_lora_rank: int,
               scale: float) -> torch.Tensor:
        plan = self._plan_of(batch, cache.shape[1])
        ctx = cache[plan.blocks].flatten(1, 2)  # [N, P, c+r]
        q = query * scale if plan.owner is None else (query * scale)[plan.owner]  # [N, h, c+r]
        # Plain batched products: SDPA over a head-broadcast latent key falls back to a slow path.
        scores = torch.bmm(q, ctx.transpose(1, 2)).masked_fill_(~plan.valid, float("-inf"))  # [N, h, P]
        values = ctx[..., :kv_lora_rank]  # [N, P, c]
        if plan.owner is None:
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
            return torch.bmm(probs, values)  # [B, h, c]
        # Scatters with accumulation are serial on CPUs: the per-sequence maximum goes through a dense
        # [B, P] layout and the per-sequence sums are one product with the membership matrix.
        b, heads = query.shape[:2]
        assert plan.cell is not None and plan.members is not None
        scores = scores.float()
        peak = scores.amax(dim=-1)  # [N, h]; every partition holds a valid token
        weights = scores.sub_(peak[..., None]).exp_()  # [N, h, P]
        partial = torch.bmm(weights.to(query.dtype), values).float()  # [N, h, c]
        dense = torch.full((b * plan.most, heads), float("-inf"), device=query.device)
        dense[plan.cell] = peak
        top = dense.view(b, -1, heads).amax(dim=1)  # [B, h]
        rescale = (peak - top[plan.owner]).exp()  # [N, h]
        total = plan.members @ (weights.sum(-1) * rescale)  # [B, h]
        summed = plan.members @ (partial * rescale[..., None]).view(-1, heads * kv_lora_rank)  # [B, h*c]
        return (summed.view(b, heads, kv_lora_rank) / total[..., None]).to(query.dtype)

    def _plan_of(self, batch: DecodeBatch, block_size: int) -> DecodePlan:
        if self._plan is None or self._plan[0] is not batch:
            self._plan = (batch, plan_decode(batch, block_size))
        return self._plan[1]
