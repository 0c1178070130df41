"""The engine loop: admit requests, schedule a step, have the model runner compute and sample
it, fork the choices of requests whose prompt just completed, detect stops, report outputs."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.engine.block_manager import BlockManager
from cluster.engine.engine_config import EngineConfig, resolve_limits
from cluster.engine.grammar import GrammarCompiler
from cluster.engine.kv_pool import free_at_start, size_pool
from cluster.engine.model_runner import ModelRunner
from cluster.engine.prefix_hash import block_keys, extend_block_keys
from cluster.engine.sampler import choice_generator
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerConfig
from cluster.engine.sequence import EngineOutput, Sequence, Status
from cluster.engine.stats import EngineSnapshot, EngineStats, KVLoad
from cluster.engine.stop import StopChecker
from cluster.errors import (
    DuplicateRequestError,
    InvalidGrammarError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    PromptTooLongError,
    RequestError,
)
from cluster.model.config import load_model_config
from cluster.model.dispatch import Dispatcher
from cluster.model.image_rows import ImageRows
from cluster.model.text_model import Mistral4TextModel
from cluster.model.weight_source import open_weights

log = logging.getLogger(__name__)


@dataclass
class _Counters:
    forward_calls: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    aborts: int = 0
    reforms: list[float] = field(default_factory=list)  # seconds each re-form took (the runner's list)


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None, dispatcher: Dispatcher) -> None:
        """`dispatcher` computes the routed experts (`cluster.experts.dispatchers.load_local_dispatcher`
        in-process, or a transport's); the engine owns it from here and closes it."""
        self.model_dir = Path(model_dir)
        self.config = config or EngineConfig()
        self.model_config = load_model_config(self.model_dir)
        self.text = self.model_config.text
        device, dtype = self.config.resolved_device(), self.config.torch_dtype
        free_before_load = free_at_start(device)
        weights = open_weights(self.model_dir, self.model_config, self.config.load_format, device, dtype)
        self.runner = ModelRunner(weights, dispatcher, device, dtype, self.config.resolved_attention_backend())
        self.limits = limits = resolve_limits(self.config, self.text, self.runner.dtype,
                                              size_pool(self.config, self.runner, free_before_load))
        log.info("engine %s: %s", self.model_dir.name, limits.describe())
        self.max_model_len = limits.max_model_len
        self.blocks = BlockManager(limits.num_kv_blocks, self.config.block_size, self.config.enable_prefix_caching)
        graphs = self.config.uses_cuda_graphs() and dispatcher.graph_safe()
        # Under decode graphs one more block, owned by no sequence, takes the padding rows' latents.
        self.runner.allocate_caches(limits.num_kv_blocks + int(graphs), self.config.block_size)
        if graphs:
            started = time.monotonic()
            self.runner.capture_decode_graphs(self.config.max_num_seqs, limits.max_model_len,
                                              scratch_block=limits.num_kv_blocks)
            log.info("engine %s: decode CUDA graphs %s (%.1f s)", self.model_dir.name,
                     self.runner.graphs.sizes if self.runner.graphs else "not capturable", time.monotonic() - started)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   self.config.target_step_ms, self.config.min_prefill_tokens),
                                   self.blocks)
        self.stop = StopChecker.for_model_dir(self.model_dir, self.text.eos_token_id)
        self.runner.eos_ids = frozenset(self.stop.eos_ids)
        self._requests: dict[str, list[Sequence]] = {}  # every choice of every unfinished request
        self._grammar_compiler: GrammarCompiler | None = None
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self.counters = _Counters(reforms=self.runner.reforms)
        # When the last step left work, its start: its time is measured up to the next step's start,
        # so what the consumer does with its outputs (the streams' cost between steps) counts in.
        self._step_started: float | None = None

    @property
    def model(self) -> Mistral4TextModel:
        return self.runner.model

    @property
    def caches(self) -> list[torch.Tensor]:
        return self.runner.caches

    @property
    def dispatcher(self) -> Dispatcher:
        return self.runner.dispatcher

    @dispatcher.setter
    def dispatcher(self, dispatcher: Dispatcher) -> None:
        """Wrapping the dispatcher (e.g. to time exchanges) takes effect from the next step."""
        self.runner.dispatcher = dispatcher

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
                    images: ImageRows | None = None, cache_salt: str | None = None) -> None:
        """Queues the request. With `params.n` > 1 it runs as one sequence until its prompt is
        prefilled; then its other choices are forked from it, sharing its full prompt blocks, and
        each choice reports its own outputs (`EngineOutput.index`). It starts after the longest
        prefix of its prompt in the prefix cache; `cache_salt` shares cached blocks only with
        requests of the same salt."""
        if request_id in self._requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        self.validate_prompt(prompt_token_ids)
        if params.logit_bias and params.logit_bias[-1][0] >= self.text.vocab_size:  # sorted by id
            raise InvalidSamplingParamsError(f"logit_bias token id {params.logit_bias[-1][0]} is outside the "
                                             f"vocabulary [0, {self.text.vocab_size})")
        if params.n > self.config.max_num_seqs:
            raise InvalidSamplingParamsError(f"n={params.n} exceeds this engine's max_num_seqs="
                                             f"{self.config.max_num_seqs} (the choices run at once)")
        if images is not None:
            self._validate_images(images, len(prompt_token_ids))
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise RequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        matchers = self._grammars().matchers(params.grammar, params.n) if params.grammar is not None else None
        arrival = next(self._arrivals)
        keys = (block_keys(prompt_token_ids, self.blocks.block_size, images, cache_salt) if self.blocks.caching
                else [])
        choices = [Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, arrival, images=images,
                            generator=choice_generator(params, i), index=i, seq_id=next(self._seq_ids),
                            cache_salt=cache_salt, block_keys=list(keys))
                   for i in range(params.n)]
        for seq, matcher in zip(choices, matchers or (), strict=False):
            seq.grammar = matcher
        self.stop.start(choices[0])
        choices[0].forks = choices[1:]
        self._requests[request_id] = choices
        self.scheduler.add(choices[0])
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

    def abort(self, request_id: str, index: int | None = None) -> EngineOutput | None:
        """Aborts choice `index` of the request, or (None) all its unfinished choices, freeing
        their blocks. Returns the aborted output (of the lowest aborted choice), or None when
        nothing of that was running."""
        choices = self._requests.get(request_id)
        if choices is None:
            return None
        targets = [s for s in choices if not s.finished and (index is None or s.index == index)]
        if not targets:
            return None
        for seq in targets:
            self._drop(seq, keep_forks=index is not None)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            seq.grammar = None
        if all(s.finished for s in choices):
            del self._requests[request_id]
        self.counters.aborts += 1
        return [self._output(s) for s in targets][0]

    def _drop(self, seq: Sequence, keep_forks: bool) -> None:
        """Takes an unfinished choice out of the scheduler and frees its blocks (or, not forked
        yet, out of the choices waiting for it). With `keep_forks`, the choices still to be forked
        from it go on without it: the first of them takes its place."""
        for other in self._requests[seq.request_id]:
            if seq in other.forks:
                other.forks.remove(seq)
                return
        self.scheduler.remove(seq)
        forks, seq.forks = seq.forks, []
        if keep_forks and forks:
            forks[0].forks = forks[1:]
            self.scheduler.add(forks[0])

    def block_tables(self, request_id: str) -> tuple[tuple[int, ...], ...]:
        """The KV block table of each of the request's choices, in index order (empty for a choice
        holding none: not forked yet, preempted or finished); () for a request not in the engine."""
        return tuple(self.blocks.table(s.seq_id) for s in self._requests.get(request_id, ()))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Runs one step; an output per request it advanced, with only that step's tokens."""
        started = time.perf_counter()
        if self._step_started is not None:
            self.scheduler.observe_step((started - self._step_started) * 1e3)
            self._step_started = None
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        # Who takes a token from each sequence's last position: itself, and when its prompt just
        # completed, the choices to fork from it too (they sample from the same logits).
        samples = [[s.seq, *s.seq.forks] if s.completes else [] for s in scheduled]
        tables = self.blocks.block_tables([s.seq.seq_id for s in scheduled])
        result = self.runner.execute(scheduled, tables, samples)
        self.counters.forward_calls += 1
        self.counters.steps += 1
        for s in scheduled:
            s.seq.num_computed += s.num_new
            self._cache_computed(s.seq)
        outputs = []
        row = 0
        for s, group in zip(scheduled, samples, strict=True):
            if group and s.seq.forks:  # its prompt just completed
                self._fork(s.seq)
            for seq in group:
                tok, lp = result.tokens[row], result.logprobs[row]
                row += 1
                if lp is not None:
                    seq.logprobs.append(lp)
                seq.token_ids.append(tok)
                self.counters.generation_tokens += 1
                if seq.grammar is not None and not seq.grammar.accept(tok):
                    log.warning("request %s#%d: grammar refused token %d: %s", seq.request_id, seq.index, tok,
                                seq.grammar.error)
                self.stop.update(seq, tok, self.max_model_len)
                if seq.finished:
                    seq.grammar = None
                    self.scheduler.remove(seq)
                    if all(c.finished for c in self._requests[seq.request_id]):
                        del self._requests[seq.request_id]
                outputs.append(self._output(seq))
        if self.scheduler.has_work():
            self._step_started = started
        else:
            self.scheduler.observe_step((time.perf_counter() - started) * 1e3)
        return outputs

    def _cache_computed(self, seq: Sequence) -> None:
        """Registers the sequence's computed full blocks in the prefix cache (its prompt's and, as
        they fill, its output's)."""
        if not self.blocks.caching:
            return
        full = seq.num_computed // self.blocks.block_size
        if full > len(seq.block_keys):
            extend_block_keys(seq.block_keys, seq.token_ids, self.blocks.block_size, seq.images, seq.cache_salt,
                              limit=full)
        self.blocks.cache_blocks(seq.seq_id, seq.block_keys, full)

    def _grammars(self) -> GrammarCompiler:
        """The grammar compiler over this model's tokenizer, made on the first request with a
        grammar (mapping the vocabulary takes seconds, once per process)."""
        if self._grammar_compiler is None:
            if self.stop.tokenizer is None:
                raise InvalidGrammarError("grammar", "this model directory has no tokenizer to compile grammars over")
            self._grammar_compiler = GrammarCompiler.for_tokenizer(self.stop.tokenizer)
        return self._grammar_compiler

    def _fork(self, parent: Sequence) -> None:
        """Starts the choices waiting for `parent`'s prompt: each shares the prompt's full blocks
        and recomputes the tokens of a partial last block into a block of its own."""
        for child in parent.forks:
            child.num_computed = self.blocks.fork(parent.seq_id, child.seq_id, parent.num_prompt_tokens)
            child.num_cached_tokens = parent.num_cached_tokens
            self.scheduler.add_forked(child)
        parent.forks = []

    def _output(self, seq: Sequence) -> EngineOutput:
        """Only what is new since the sequence's last output (the prompt ids on its first)."""
        new = tuple(seq.token_ids[seq.num_prompt_tokens + seq.reported:])
        seq.reported += len(new)
        prompt = None if seq.prompt_reported else tuple(seq.token_ids[:seq.num_prompt_tokens])
        seq.prompt_reported = True
        logprobs = tuple(seq.logprobs) if seq.params.logprobs is not None else None
        seq.logprobs.clear()
        return EngineOutput(seq.request_id, new, seq.finished, seq.finish_reason, seq.stop_reason, logprobs, prompt,
                            index=seq.index, num_cached_tokens=None if prompt is None else seq.num_cached_tokens or 0)

    # -- state -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions, forward_calls=self.counters.forward_calls,
            prompt_tokens=self.counters.prompt_tokens, generation_tokens=self.counters.generation_tokens,
            aborts=self.counters.aborts, prefix_queried_tokens=self.scheduler.num_queried_tokens,
            prefix_cached_tokens=self.scheduler.num_cached_tokens, prefix_cached_blocks=self.blocks.num_cached)

    def kv_load(self) -> KVLoad:
        """Free KV blocks and the blocks that the prompts already here will still take (request
        routing prefers the replica with the most of the difference)."""
        blocks, reserved = self.blocks, 0
        for seq in itertools.chain(self.scheduler.running, self.scheduler.waiting):
            if seq.num_computed < len(seq.token_ids):
                reserved += max(blocks.blocks_for(len(seq.token_ids)) - blocks.num_held(seq.seq_id), 0)
            if seq.num_prompt_tokens % blocks.block_size:
                reserved += len(seq.forks)  # each fork's own copy of the partial last prompt block
        return KVLoad(blocks.num_free, reserved, blocks.num_blocks, blocks.block_size,
                      len(self.scheduler.running), len(self.scheduler.waiting))

    def snapshot(self) -> EngineSnapshot:
        """Stats, KV load, the dispatcher's expert token counts and the re-form times, as copies
        (what `AsyncEngine` publishes after every change)."""
        return EngineSnapshot(self.stats(), self.kv_load(), self.dispatcher.token_counts(),
                              tuple(self.counters.reforms))

    def check_integrity(self) -> None:
        """The scheduler's and block manager's checks, and: every unfinished choice of every request
        is either scheduled or waiting, unforked and holding no blocks, for a scheduled choice of
        its own request; finished choices hold nothing; finished requests are gone."""
        self.scheduler.check_integrity()
        queued = {id(s): s for s in itertools.chain(self.scheduler.running, self.scheduler.waiting)}
        pending = {id(f): f for s in queued.values() for f in s.forks}
        tracked = [s for choices in self._requests.values() for s in choices]
        for seq in tracked:
            where = f"{seq.request_id}#{seq.index}"
            if seq.finished:
                if id(seq) in queued or id(seq) in pending or self.blocks.num_held(seq.seq_id):
                    raise RuntimeError(f"finished choice {where} is still queued or holds blocks")
                if seq.grammar is not None:
                    raise RuntimeError(f"finished choice {where} still holds its grammar matcher")
            elif id(seq) in pending:
                if self.blocks.num_held(seq.seq_id) or seq.num_computed:
                    raise RuntimeError(f"choice {where} is not forked yet but holds blocks")
                if not any(f is seq for s in queued.values() if s.request_id == seq.request_id for f in s.forks):
                    raise RuntimeError(f"choice {where} waits to be forked from another request's sequence")
            elif id(seq) not in queued:
                raise RuntimeError(f"unfinished choice {where} is neither queued nor waiting to be forked")
        if len(queued) + len(pending) != sum(not s.finished for s in tracked):
            raise RuntimeError(f"the scheduler holds {len(queued)} sequences and {len(pending)} pending choices; "
                               f"the engine tracks {sum(not s.finished for s in tracked)} unfinished")
        done = [rid for rid, choices in self._requests.items() if all(s.finished for s in choices)]
        if done:
            raise RuntimeError(f"finished requests are still tracked: {done}")

    def close(self) -> None:
        self.dispatcher.close()
