"""The grammar's part of sampling: the tokens each grammar row may take next, as one bitmask the
matchers fill together (llguidance's executor, threads over the rows), unpacked and applied to the
batch's logits as one tensor operation. Rows without a grammar cost a look at their matcher; with no
grammar row the logits are returned as they are."""

from __future__ import annotations

from collections.abc import Sequence

import llguidance as llg
import torch
from llguidance.torch import fill_next_token_bitmask_par

from cluster.engine.grammar import GrammarMatcher

_executor: llg.LLExecutor | None = None
_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)  # bit i of a word


def mask_logits(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None], inplace: bool = False
                ) -> torch.Tensor:
    """logits [S, V], one row per sampling sequence -> the same with the tokens its grammar does
    not allow next at -inf, in rows with a matcher (written into a copy unless `inplace`, which
    the caller sets for logits already adjusted: there a row may have lost every allowed token to
    -inf, min_tokens holding back the EOS a finished grammar needs, and then takes the grammar's
    tokens evenly: the grammar wins)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    allowed = allowed_tokens([m for m in matchers if m is not None], logits.shape[-1]).to(logits.device)  # [R, V]
    out = logits if inplace else logits.clone()
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)  # [R]
    masked = out[index].masked_fill_(~allowed, float("-inf"))  # [R, V]
    if inplace:
        dead = torch.isneginf(masked.amax(-1))  # [R]
        if bool(dead.any()):
            masked[dead] = torch.zeros_like(masked[dead]).masked_fill_(~allowed[dead], float("-inf"))
    out[index] = masked
    return out


def allowed_tokens(matchers: Sequence[GrammarMatcher], vocab: int) -> torch.Tensor:
    """[R, V] bool: the tokens each matcher allows next (none past the tokenizer's vocabulary; a
    matcher that allows nothing, in an error state, allows everything rather than leave its row
    without a token)."""
    global _executor
    if _executor is None:
        _executor = llg.LLExecutor()
    words = (matchers[0].vocab_size + 31) // 32
    bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)  # [R, W], 32 tokens a word
    fill_next_token_bitmask_par(_executor, [(m.matcher, r) for r, m in enumerate(matchers)], bitmask)
    empty = (bitmask == 0).all(-1)  # [R]
    if bool(empty.any()):
        bitmask[empty] = -1
    bits = (bitmask[:, :, None] & _BITS).ne(0).view(len(matchers), -1)  # [R, W*32]
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))  # [R, V]
