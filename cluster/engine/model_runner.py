"""The model side of a step: the device, the dtype, the model, its KV cache, the step's inputs as
tensors, the forward pass (re-run after a lost expert exchange) and sampling.

The scheduler decides what a step computes; the runner turns that into one forward over a flat
batch. Inputs are built as whole-batch tensor operations from the block tables (no per-sequence
tensor work for decodes), and rope tables are computed once per position, not per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.engine.block_manager import blocks_needed
from cluster.engine.grammar_mask import mask_logits
from cluster.engine.logit_adjustments import adjust_logits, record
from cluster.engine.sampler import logprobs, sample
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq
from cluster.engine.sequence import Sequence, TokenLogprobs
from cluster.model.attention_backend import AttentionMetadata, DecodeBatch, SeqSpan
from cluster.model.checkpoint import CheckpointReader
from cluster.model.dispatch import Dispatcher, ExchangeFailedError
from cluster.model.text_model import Mistral4TextModel

MAX_STEP_RETRIES = 3
# Rope types whose tables depend on the batch's longest position rather than on each position.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # one per sampling sequence, in the order they were given
    logprobs: list[TokenLogprobs | None]  # likewise; None where logprobs were not asked for


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata
    inputs_embeds: torch.Tensor | None  # [T, H] where image rows replace token embeddings
    logits_rows: torch.Tensor  # [U] flat rows whose logits are needed (each sampled position once)
    samples_per_row: torch.Tensor  # [U] sampling sequences per logits row


class ModelRunner:
    def __init__(self, reader: CheckpointReader, dispatcher: Dispatcher, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, attention_backend: str = "torch") -> None:
        """Loads the dense model; `dispatcher` computes the routed experts. `dtype` None keeps the
        checkpoint's; `attention_backend` names the kernels that attend
        (`cluster.model.attention.ATTENTION_BACKENDS`). Only the CPU is exercised today: the experts
        stay where the dispatcher keeps them, so another device is for a later change."""
        self.device = torch.device(device)
        model = Mistral4TextModel.from_reader(reader, attention_backend)
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
        self.model = model.to(self.device)
        self.dtype = self.model.dtype
        self.dispatcher = dispatcher
        self.eos_ids: frozenset[int] = frozenset()  # held back with the stop ids under min_tokens (the engine's)
        self.reforms: list[float] = []  # seconds each expert-group re-formation took, oldest first
        self.text = reader.config.text
        self.caches: list[torch.Tensor] = []
        self.block_size = 0
        rope_type = (self.text.hf_config().rope_parameters or {}).get("rope_type", "default")
        self._rope_table = not any(kind in rope_type for kind in _LENGTH_DEPENDENT_ROPE)
        self._range = torch.zeros(0, dtype=torch.long)
        self._cos = self._sin = self._query_scale = torch.zeros(0)

    def allocate_caches(self, num_blocks: int, block_size: int) -> None:
        """One latent cache per layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
        self.block_size = block_size
        self.caches = [torch.zeros(num_blocks, block_size, self.text.latent_dim, dtype=self.dtype, device=self.device)
                       for _ in range(self.text.num_hidden_layers)]

    def profile_step(self, num_tokens: int, block_size: int) -> None:
        """A `num_tokens`-token prefill over a scratch cache that is dropped afterwards: the step
        whose peak memory the GPU pool sizing measures (its routed tokens count in the
        dispatcher's expert counts, as any step's)."""
        num_blocks = blocks_needed(num_tokens, block_size)
        self.allocate_caches(num_blocks, block_size)
        seq = Sequence("profile", [0] * num_tokens, num_tokens, SamplingParams(max_tokens=1, temperature=0.0), 0)
        self.execute([ScheduledSeq(seq, num_tokens)], torch.arange(num_blocks)[None, :], [[seq]])
        self.caches = []

    # -- a step --------------------------------------------------------------------------------

    def execute(self, scheduled: list[ScheduledSeq], block_tables: torch.Tensor,
                samples: list[list[Sequence]]) -> StepResult:
        """Runs one step. `block_tables` [B, W] are the scheduled sequences' tables; `samples[i]`
        are the sequences that take a token from scheduled[i]'s last position this step (none in
        the middle of a prefill; the sequence itself, and with it the choices still to be forked
        from it when its prompt completes)."""
        inputs = self.prepare(scheduled, block_tables, samples)
        logits = self.forward(inputs)
        if logits.shape[0] != int(inputs.samples_per_row.sum()):
            logits = logits.repeat_interleave(inputs.samples_per_row.to(logits.device), dim=0)  # [S, V]
        flat = [seq for group in samples for seq in group]
        adjusted = adjust_logits(logits, flat, self.eos_ids)  # [S, V]: bias, penalties, min_tokens
        adjusted = mask_logits(adjusted, [s.grammar for s in flat], inplace=adjusted is not logits)  # [S, V]
        tokens = sample(adjusted, [s.params for s in flat], [s.generator for s in flat])
        lps = logprobs(logits, tokens, [s.params.logprobs for s in flat])  # of the model's own distribution
        chosen = tokens.tolist()
        record(flat, chosen)
        return StepResult(chosen, lps)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """One forward over the step -> logits [U, V]. A lost expert exchange re-forms the group
        (its duration goes to `reforms`) and re-runs the step: the step writes the same latents to
        the same cache slots, so the re-run is exact."""
        for attempt in range(MAX_STEP_RETRIES + 1):
            try:
                return self.model(inputs.input_ids, inputs.meta, self.caches, self.dispatcher, inputs.logits_rows,
                                  inputs_embeds=inputs.inputs_embeds)
            except ExchangeFailedError:
                if attempt == MAX_STEP_RETRIES:
                    raise
                started = time.monotonic()
                self.dispatcher.recover()
                self.reforms.append(time.monotonic() - started)
        raise AssertionError("unreachable")

    def prepare(self, scheduled: list[ScheduledSeq], block_tables: torch.Tensor,
                samples: list[list[Sequence]]) -> StepInputs:
        bs = self.block_size
        b = len(scheduled)
        starts = [s.seq.num_computed for s in scheduled]
        counts = [s.num_new for s in scheduled]
        ids: list[int] = []
        for s, c, n in zip(scheduled, starts, counts, strict=True):
            ids.extend(s.seq.token_ids[c:c + n])
        num_tokens = len(ids)
        start_t = torch.tensor(starts)  # [B]
        count_t = torch.tensor(counts)  # [B]
        ends = start_t + count_t  # [B] context length of each sequence after this step
        arange = self._arange(num_tokens)
        if num_tokens == b:  # decodes only: one new token per sequence
            owner = arange[:b]
            positions = start_t
        else:
            owner = torch.repeat_interleave(arange[:b], count_t)  # [T] sequence of each token
            offsets = torch.cumsum(count_t, 0) - count_t  # [B] first flat row of each sequence
            positions = start_t[owner] + arange[:num_tokens] - offsets[owner]  # [T]
        slot_mapping = block_tables[owner, positions // bs] * bs + positions % bs  # [T]

        decode_idx = [i for i, n in enumerate(counts) if n == 1]
        decode = None
        flat_starts = [0] * b
        acc = 0
        for i, n in enumerate(counts):
            flat_starts[i] = acc
            acc += n
        if decode_idx:
            longest = max(starts[i] for i in decode_idx) + 1
            if len(decode_idx) == b:
                decode = DecodeBatch(arange[:b], block_tables, ends, longest)
            else:
                sel = torch.tensor(decode_idx)
                rows = torch.tensor([flat_starts[i] for i in decode_idx])
                decode = DecodeBatch(rows, block_tables[sel], ends[sel], longest)
        spans = [SeqSpan(flat_starts[i], n, c + n, block_tables[i])
                 for i, (c, n) in enumerate(zip(starts, counts, strict=True)) if n > 1]

        cos, sin, query_scale = self._rope(positions)
        meta = AttentionMetadata(positions, slot_mapping, tuple(spans), decode, cos, sin, query_scale)
        input_ids = torch.tensor(ids, dtype=torch.long)
        inputs_embeds = self._image_embeds(scheduled, starts, counts, flat_starts, input_ids)
        sampled = [i for i, group in enumerate(samples) if group]
        logits_rows = torch.tensor([flat_starts[i] + counts[i] - 1 for i in sampled], dtype=torch.long)
        per_row = torch.tensor([len(samples[i]) for i in sampled], dtype=torch.long)
        if self.device.type != "cpu":
            return _to_device(StepInputs(input_ids, meta, inputs_embeds, logits_rows, per_row), self.device)
        return StepInputs(input_ids, meta, inputs_embeds, logits_rows, per_row)

    def _image_embeds(self, scheduled: list[ScheduledSeq], starts: list[int], counts: list[int],
                      flat_starts: list[int], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Token embeddings with the image rows of prompts in this step put in, or None."""
        hits: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows in the flat batch, [n, H])
        for s, c, n, at in zip(scheduled, starts, counts, flat_starts, strict=True):
            images = s.seq.images
            if images is None or c >= s.seq.num_prompt_tokens:
                continue
            hit = (images.positions >= c) & (images.positions < c + n)
            if bool(hit.any()):
                hits.append((at - c + images.positions[hit], images.embeds[hit]))
        if not hits:
            return None
        embeds = self.model.embed_tokens(input_ids.to(self.device))  # [T, H]
        for rows, e in hits:
            embeds[rows.to(self.device)] = e.to(embeds.dtype).to(self.device)
        return embeds

    # -- per-position tables -------------------------------------------------------------------

    def _arange(self, n: int) -> torch.Tensor:
        """0, 1, 2, ... (at least n of them), allocated once and grown on demand."""
        if self._range.shape[0] < n:
            self._range = torch.arange(max(n, 2 * self._range.shape[0], 1024))
        return self._range

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin [T, rope] and the query scale [T] of `positions` [T]. Mistral 4's rope (yarn)
        is a function of each position alone, so rows of a table grown on demand are exactly what
        computing them per step gives."""
        rope = self.model.rope
        if not self._rope_table:
            cos, sin = rope.cos_sin(positions, self.dtype)
            return cos, sin, rope.query_scale(positions)
        need = int(positions.max()) + 1
        if self._cos.shape[0] < need:
            size = max(need, min(max(2 * self._cos.shape[0], 1024), self.text.max_position_embeddings))
            every = torch.arange(size)
            self._cos, self._sin = rope.cos_sin(every, self.dtype)
            self._query_scale = rope.query_scale(every)
        return self._cos[positions], self._sin[positions], self._query_scale[positions]


def _to_device(inputs: StepInputs, device: torch.device) -> StepInputs:
    m = inputs.meta
    d = m.decode
    decode = None if d is None else DecodeBatch(d.rows.to(device), d.block_tables.to(device),
                                                d.context_lens.to(device), d.longest)
    spans = tuple(SeqSpan(s.start, s.num_new, s.context_len, s.block_table.to(device)) for s in m.spans)
    meta = AttentionMetadata(m.positions.to(device), m.slot_mapping.to(device), spans, decode, m.cos.to(device),
                             m.sin.to(device), m.query_scale.to(device))
    embeds = None if inputs.inputs_embeds is None else inputs.inputs_embeds.to(device)
    return StepInputs(inputs.input_ids.to(device), meta, embeds, inputs.logits_rows.to(device),
                      inputs.samples_per_row)
