"""The engine loop: admit requests, schedule a step, run one forward over every scheduled
sequence, sample, detect stops, report outputs."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.engine.block_manager import BlockManager, allocate_caches
from cluster.engine.engine_config import EngineConfig, resolve_limits
from cluster.engine.sampler import logprobs_of, sample
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from cluster.engine.sequence import EngineOutput, Sequence, Status
from cluster.engine.stats import EngineStats, KVLoad
from cluster.engine.stop import StopChecker
from cluster.errors import DuplicateRequestError, InvalidTokenError, PromptTooLongError, RequestError
from cluster.model.attention import AttentionMetadata, DecodeBatch, SeqSpan
from cluster.model.checkpoint import CheckpointReader
from cluster.model.config import load_model_config
from cluster.model.dispatch import Dispatcher, ExchangeFailedError
from cluster.model.image_rows import ImageRows
from cluster.model.text_model import Mistral4TextModel

MAX_STEP_RETRIES = 3


@dataclass
class _Counters:
    forward_calls: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    aborts: int = 0
    reforms: list[float] = field(default_factory=list)  # seconds each re-form took


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None, dispatcher: Dispatcher) -> None:
        """`dispatcher` computes the routed experts (`cluster.experts.dispatchers.load_local_dispatcher`
        in-process, or a transport's); the engine owns it from here and closes it."""
        self.model_dir = Path(model_dir)
        self.config = config or EngineConfig()
        self.model_config = load_model_config(self.model_dir)
        self.text = self.model_config.text
        reader = CheckpointReader(self.model_dir, self.model_config)
        self.model = Mistral4TextModel.from_reader(reader)
        self.dispatcher = dispatcher
        limits = resolve_limits(self.config, self.text, self.model.dtype)
        self.max_model_len = limits.max_model_len
        self.blocks = BlockManager(limits.num_kv_blocks, self.config.block_size)
        self.caches = allocate_caches(self.text, limits.num_kv_blocks, self.config.block_size, self.model.dtype)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens),
                                   self.blocks)
        self.stop = StopChecker.for_model_dir(self.model_dir, self.text.eos_token_id)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.counters = _Counters()

    # -- requests ----------------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise RequestError("prompt is empty: at least one token is needed")
        vocab = self.text.vocab_size
        for i, tok in enumerate(prompt_token_ids):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab:
                raise InvalidTokenError(f"prompt token {i} is {tok!r}, outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(prompt_token_ids)} tokens; the context limit is "
                                     f"{self.max_model_len} (prompt plus at least one generated token)")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    images: ImageRows | None = None) -> None:
        if request_id in self._seqs:
            raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        self.validate_prompt(prompt_token_ids)
        if images is not None:
            self._validate_images(images, len(prompt_token_ids))
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, next(self._arrivals),
                       images=images)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.stop.start(seq)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        self.counters.prompt_tokens += len(prompt_token_ids)

    def _validate_images(self, images: ImageRows, prompt_len: int) -> None:
        n = images.positions.shape[0]
        if tuple(images.embeds.shape) != (n, self.text.hidden_size):
            raise RequestError(f"image embeddings have shape {tuple(images.embeds.shape)}, expected "
                               f"({n}, {self.text.hidden_size})")
        if n and (images.positions.min() < 0 or images.positions.max() >= prompt_len
                  or not bool((images.positions.diff() > 0).all())):
            raise RequestError(f"image positions must be increasing prompt positions in [0, {prompt_len})")
        if not bool(torch.isfinite(images.embeds).all()):
            raise RequestError("image embeddings contain NaN or infinity")

    def abort(self, request_id: str) -> EngineOutput | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        self.counters.aborts += 1
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Runs one step; an output per request it advanced, with only that step's tokens."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        input_ids, meta, embeds, rows = self._prepare(scheduled)
        logits = self._forward(input_ids, meta, embeds, rows)
        self.counters.steps += 1
        completing = [s for s in scheduled if s.completes]
        for s in scheduled:
            s.seq.num_computed += s.num_new
        tokens = sample(logits, [s.seq.params for s in completing], [s.seq.generator for s in completing])
        outputs = []
        for row, (s, tok) in enumerate(zip(completing, tokens, strict=True)):
            seq = s.seq
            if seq.params.logprobs is not None:
                seq.logprobs.append(logprobs_of(logits[row], tok, seq.params.logprobs))
            seq.token_ids.append(tok)
            self.counters.generation_tokens += 1
            self.stop.update(seq, tok, self.max_model_len)
            if seq.finished:
                self.scheduler.remove(seq)
                del self._seqs[seq.request_id]
            outputs.append(self._output(seq))
        return outputs

    def _forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, embeds: torch.Tensor | None,
                 rows: torch.Tensor) -> torch.Tensor:
        """One forward over the step; a lost expert exchange re-forms the group and re-runs it
        (the step writes the same latents to the same cache slots, so the re-run is exact)."""
        for attempt in range(MAX_STEP_RETRIES + 1):
            try:
                logits = self.model(input_ids, meta, self.caches, self.dispatcher, rows, inputs_embeds=embeds)
                self.counters.forward_calls += 1
                return logits
            except ExchangeFailedError:
                if attempt == MAX_STEP_RETRIES:
                    raise
                started = time.monotonic()
                self.dispatcher.recover()
                self.counters.reforms.append(time.monotonic() - started)
        raise AssertionError("unreachable")

    def _prepare(self, scheduled: list[ScheduledSeq]
                 ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor | None, torch.Tensor]:
        ids, positions, slots, spans, rows = [], [], [], [], []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        embeds: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows in the flat batch, [n, H])
        start = 0
        for s in scheduled:
            seq, c, n = s.seq, s.seq.num_computed, s.num_new
            ids.extend(seq.token_ids[c:c + n])
            positions.append(torch.arange(c, c + n))
            context = self.blocks.slots(seq.request_id, 0, c + n)
            slots.append(context[c:])
            if n == 1:
                decode_rows.append(start)
                decode_slots.append(context)
            else:
                mask = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None]  # [n, c+n]
                spans.append(SeqSpan(start, n, context, mask))
            if seq.images is not None and c < seq.num_prompt_tokens:
                pos = seq.images.positions
                hit = (pos >= c) & (pos < c + n)
                if bool(hit.any()):
                    embeds.append((start - c + pos[hit], seq.images.embeds[hit]))
            if s.completes:
                rows.append(start + n - 1)
            start += n
        input_ids = torch.tensor(ids, dtype=torch.long)
        pos = torch.cat(positions)
        cos, sin = self.model.rope.cos_sin(pos, self.model.dtype)
        meta = AttentionMetadata(pos, torch.cat(slots), tuple(spans), _decode_batch(decode_rows, decode_slots),
                                 cos, sin, self.model.rope.query_scale(pos))
        inputs_embeds = None
        if embeds:
            inputs_embeds = self.model.embed_tokens(input_ids)
            for at, e in embeds:
                inputs_embeds[at] = e.to(inputs_embeds.dtype)
        return input_ids, meta, inputs_embeds, torch.tensor(rows, dtype=torch.long)

    def _output(self, seq: Sequence) -> EngineOutput:
        """Only what is new since the sequence's last output (the prompt ids on its first)."""
        new = tuple(seq.token_ids[seq.num_prompt_tokens + seq.reported:])
        seq.reported += len(new)
        prompt = None if seq.prompt_reported else tuple(seq.token_ids[:seq.num_prompt_tokens])
        seq.prompt_reported = True
        logprobs = tuple(seq.logprobs) if seq.params.logprobs is not None else None
        seq.logprobs.clear()
        return EngineOutput(seq.request_id, new, seq.finished, seq.finish_reason, seq.stop_reason, logprobs, prompt)

    # -- state -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions, forward_calls=self.counters.forward_calls,
            prompt_tokens=self.counters.prompt_tokens, generation_tokens=self.counters.generation_tokens,
            aborts=self.counters.aborts)

    def kv_load(self) -> KVLoad:
        """Free KV blocks and the blocks that the prompts already here will still take (request
        routing prefers the replica with the most of the difference)."""
        blocks, reserved = self.blocks, 0
        for seq in itertools.chain(self.scheduler.running, self.scheduler.waiting):
            if seq.num_computed < len(seq.token_ids):
                reserved += max(blocks.blocks_for(len(seq.token_ids)) - len(blocks.table(seq.request_id)), 0)
        return KVLoad(blocks.num_free, reserved, blocks.num_blocks, blocks.block_size,
                      len(self.scheduler.running), len(self.scheduler.waiting))

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        live = {s.request_id for s in self.scheduler.running} | {s.request_id for s in self.scheduler.waiting}
        if live != set(self._seqs):
            raise RuntimeError(f"engine tracks {sorted(self._seqs)} but scheduler holds {sorted(live)}")

    def close(self) -> None:
        self.dispatcher.close()


def _decode_batch(rows: list[int], contexts: list[torch.Tensor]) -> DecodeBatch | None:
    if not rows:
        return None
    lengths = torch.tensor([len(c) for c in contexts])
    padded = torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True)  # [B, Lmax], pad slot 0
    valid = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # [B, Lmax]
    return DecodeBatch(torch.tensor(rows, dtype=torch.long), padded, valid[:, None, :])
