"""The model side of a step: the device, the dtype, the model, its KV cache, the step's inputs as
tensors, the forward pass (re-run after a lost expert exchange) and sampling.

The scheduler decides what a step computes; the runner turns that into one forward over a flat
batch. Inputs are built as whole-batch tensor operations from the block tables (no per-sequence
tensor work for decodes), and rope tables are computed once per position, not per step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from cluster.engine.block_manager import blocks_needed
from cluster.engine.decode_graphs import DecodeGraphs, DecodeSlots, capture_sizes
from cluster.engine.grammar_mask import mask_logits
from cluster.engine.host_copy import HostToDevice
from cluster.engine.logit_adjustments import adjust_logits, record
from cluster.engine.sampler import logprobs, sample
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq
from cluster.engine.sequence import Sequence, TokenLogprobs
from cluster.model.attention_backend import AttentionMetadata, DecodeBatch, SeqSpan
from cluster.model.dispatch import Dispatcher, ExchangeFailedError
from cluster.model.text_model import Mistral4TextModel
from cluster.model.weight_source import WeightSource

log = logging.getLogger(__name__)
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
    def __init__(self, reader: WeightSource, dispatcher: Dispatcher, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, attention_backend: str = "torch") -> None:
        """Loads the dense model onto `device` in `dtype` (None: the checkpoint's); `dispatcher`
        computes the routed experts (in-process ones on the same device and dtype);
        `attention_backend` names the kernels that attend (`cluster.model.attention.ATTENTION_BACKENDS`).
        The step's inputs are built on the host and sent in one copy; a step reads back only its
        sampled tokens (and the logprobs asked for)."""
        self.device = torch.device(device)
        model = Mistral4TextModel.from_reader(reader, attention_backend)
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
        self.model = model.to(self.device)
        self.dtype = self.model.dtype
        self.copier = HostToDevice(self.device)
        self.graphs: DecodeGraphs | None = None
        self._graph_rows = torch.zeros(0, dtype=torch.long)  # 0, 1, ... on the device: the rows of a graph
        self._graph_longest = 0  # the context a graph's attention is shaped for
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
        logits = self._graph_decode(scheduled, block_tables, samples)  # [B, V], or None: not a graph's step
        if logits is None:
            inputs = self.prepare(scheduled, block_tables, samples)
            logits = self.forward(inputs)
            total = int(inputs.samples_per_row.sum())  # a host tensor
            if logits.shape[0] != total:  # choices forking: each takes its row (output_size: no device read)
                logits = logits.repeat_interleave(inputs.samples_per_row.to(logits.device), dim=0,
                                                  output_size=total)  # [S, V]
        flat = [seq for group in samples for seq in group]
        adjusted = adjust_logits(logits, flat, self.eos_ids)  # [S, V]: bias, penalties, min_tokens
        adjusted = mask_logits(adjusted, [s.grammar for s in flat], inplace=adjusted is not logits)  # [S, V]
        tokens = sample(adjusted, [s.params for s in flat], [s.generator for s in flat])
        lps = logprobs(logits, tokens, [s.params.logprobs for s in flat])  # of the model's own distribution
        chosen = tokens.tolist()  # the step's one read back from the device
        record(flat, chosen)
        return StepResult(chosen, lps)

    # -- decode under CUDA graphs --------------------------------------------------------------

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int, scratch_block: int,
                              capture: bool = True) -> bool:
        """Captures one decode graph per padded batch size up to `max_num_seqs` (see
        `cluster.engine.decode_graphs`); `scratch_block` is a cache block no sequence owns (padding
        rows write there). False, capturing nothing, where a step cannot be captured: the
        dispatcher or the attention backend syncs with the host, or the rope depends on the batch.
        `capture=False` runs the same bookkeeping eagerly (CPU tests)."""
        attention_ok = self.model.attention.graph_safe or not capture  # emulated: any backend
        if not (self.dispatcher.graph_safe() and attention_ok and self._rope_table):
            return False
        self._rope_tables(max(max_model_len, self._cos.shape[0]))  # once, full size: graphs read them in place
        self._graph_rows = torch.arange(max_num_seqs, device=self.device)
        self._graph_longest = -(-max_model_len // self.block_size) * self.block_size  # the tables' full width
        try:
            self.graphs = DecodeGraphs(capture_sizes(max_num_seqs), max_model_len, self.block_size, scratch_block,
                                       self.device, self._static_decode, capture)
        except RuntimeError as exc:  # a kernel that syncs or allocates on the host refuses capture
            if not capture:
                raise
            log.warning("decode CUDA graphs could not be captured, decode steps run eagerly: %s", exc)
            self.graphs = None
            return False
        return True

    def _static_decode(self, slots: DecodeSlots) -> torch.Tensor:
        """The forward a decode graph captures: static inputs -> logits [n, V]. The longest
        context is taken as max_model_len, so the attention kernel's shape is the graph's own."""
        n = slots.input_ids.shape[0]
        rows = self._graph_rows[:n]
        decode = DecodeBatch(rows, slots.block_tables, slots.context_lens, self._graph_longest)
        pos = slots.positions
        meta = AttentionMetadata(pos, slots.slot_mapping, (), decode, self._cos[pos], self._sin[pos],
                                 self._query_scale[pos])
        return self.model(slots.input_ids, meta, self.caches, self.dispatcher, rows)

    def _graph_decode(self, scheduled: list[ScheduledSeq], block_tables: torch.Tensor,
                      samples: list[list[Sequence]]) -> torch.Tensor | None:
        """Logits [B, V] of a decode-only step run by a graph, or None where the step is not one
        (a prefill chunk, a choice forking, a batch or table larger than the graphs')."""
        graphs = self.graphs
        if graphs is None or not graphs.fits(len(scheduled), block_tables.shape[1]):
            return None
        if any(s.num_new != 1 or len(group) != 1 for s, group in zip(scheduled, samples, strict=True)):
            return None
        positions = torch.tensor([s.seq.num_computed for s in scheduled], dtype=torch.long)  # [B]
        ids = torch.tensor([s.seq.token_ids[s.seq.num_computed] for s in scheduled], dtype=torch.long)  # [B]
        return graphs.run(ids, positions, block_tables)

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
        """The step's inputs, built on the host from the block tables and sent to the device in one
        copy (`samples_per_row` stays on the host)."""
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
        flat_starts = [0] * b
        acc = 0
        for i, n in enumerate(counts):
            flat_starts[i] = acc
            acc += n
        if len(decode_idx) == b:
            decode_rows, decode_tables, decode_lens = arange[:b], block_tables, ends
        else:
            sel = torch.tensor(decode_idx, dtype=torch.long)
            decode_rows = torch.tensor([flat_starts[i] for i in decode_idx], dtype=torch.long)
            decode_tables, decode_lens = block_tables[sel], ends[sel]
        spanned = [i for i, n in enumerate(counts) if n > 1]
        input_ids = torch.tensor(ids, dtype=torch.long)
        sampled = [i for i, group in enumerate(samples) if group]
        logits_rows = torch.tensor([flat_starts[i] + counts[i] - 1 for i in sampled], dtype=torch.long)
        per_row = torch.tensor([len(samples[i]) for i in sampled], dtype=torch.long)
        self._grow_rope(positions)
        sent = self.copier.to_device([input_ids, positions, slot_mapping, logits_rows, decode_rows, decode_tables,
                                      decode_lens, *(block_tables[i] for i in spanned)])
        input_ids_d, positions_d, slots_d, logits_rows_d, rows_d, tables_d, lens_d = sent[:7]
        decode = None
        if decode_idx:
            longest = max(starts[i] for i in decode_idx) + 1
            decode = DecodeBatch(rows_d, tables_d, lens_d, longest, sum(starts[i] + 1 for i in decode_idx))
        spans = tuple(SeqSpan(flat_starts[i], counts[i], starts[i] + counts[i], table)
                      for i, table in zip(spanned, sent[7:], strict=True))
        cos, sin, query_scale = self._rope(positions, positions_d)
        meta = AttentionMetadata(positions_d, slots_d, spans, decode, cos, sin, query_scale)
        inputs_embeds = self._image_embeds(scheduled, starts, counts, flat_starts, input_ids_d)
        return StepInputs(input_ids_d, meta, inputs_embeds, logits_rows_d, per_row)

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

    def _rope(self, positions: torch.Tensor, on_device: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin [T, rope] and the query scale [T] of `positions` [T] (host; `on_device` the same
        on the device). Mistral 4's rope (yarn) is a function of each position alone, so rows of a
        table grown on demand (`_grow_rope`) are exactly what computing them per step gives."""
        if not self._rope_table:
            cos, sin = self.model.rope.cos_sin(positions, self.dtype)
            scale = self.model.rope.query_scale(positions)
            return cos.to(self.device), sin.to(self.device), scale.to(self.device)
        return self._cos[on_device], self._sin[on_device], self._query_scale[on_device]

    def _grow_rope(self, positions: torch.Tensor) -> None:
        """The device's rope tables grown to cover `positions` [T] (host)."""
        if not self._rope_table:
            return
        need = int(positions.max()) + 1
        if self._cos.shape[0] < need:
            self._rope_tables(max(need, min(max(2 * self._cos.shape[0], 1024), self.text.max_position_embeddings)))

    def _rope_tables(self, size: int) -> None:
        if self.graphs is not None:  # captured graphs read the tables in place
            raise RuntimeError(f"rope tables of {self._cos.shape[0]} positions cannot grow to {size} under "
                               "captured decode graphs")
        every = torch.arange(size)
        cos, sin = self.model.rope.cos_sin(every, self.dtype)
        self._cos, self._sin = cos.to(self.device), sin.to(self.device)
        self._query_scale = self.model.rope.query_scale(every).to(self.device)
