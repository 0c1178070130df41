"""Structured output inside the engine: a request's grammar (llguidance's Lark, as mistral-common's
`GrammarFactory` renders it), compiled into one matcher per choice that follows the tokens the
choice takes and says which tokens may come next (`cluster.engine.grammar_mask` applies that to
the batch's logits). A matcher allows EOS only where the grammar is complete, so a choice under a
grammar ends with "stop" once its answer is whole.

Choices and forks each hold their own matcher; preemption by recompute keeps a choice's tokens, so
its matcher stays where it was; a finished or aborted choice lets go of it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance as llg

from cluster.errors import InvalidGrammarError

if TYPE_CHECKING:
    from mistral_common.guidance.grammar_factory import GrammarFactory

    from cluster.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Grammar:
    """What a request's answer must match. `prefix`: the tokens the prompt ends with that are the
    start of the answer (a forced `[TOOL_CALLS]name[ARGS]`); the matcher takes them first."""

    lark: str
    prefix: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.lark, str) or not self.lark.strip():
            raise InvalidGrammarError("grammar", "must be a non-empty Lark grammar")
        object.__setattr__(self, "prefix", tuple(self.prefix))


class GrammarMatcher:
    """Where one choice is in its grammar."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's: the width of the matcher's masks

    def accept(self, token_id: int) -> bool:
        """Advances over a sampled token; False if the grammar refuses it (the matcher then allows
        only EOS, so the choice stops)."""
        return self.matcher.consume_token(token_id)

    def copy(self) -> GrammarMatcher:
        return GrammarMatcher(self.matcher.deep_copy(), self.vocab_size)

    @property
    def complete(self) -> bool:
        """Whether the tokens so far are a whole answer."""
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


_factories: dict[Path, GrammarFactory] = {}
_factories_lock = threading.Lock()


def grammar_factory(tokenizer: Tokenizer) -> GrammarFactory:
    """mistral-common's `GrammarFactory` for this tokenizer, made once per model directory (it maps
    the whole vocabulary for llguidance: seconds)."""
    from mistral_common.guidance.grammar_factory import GrammarFactory

    with _factories_lock:
        factory = _factories.get(tokenizer.model_dir)
        if factory is None:
            if not GrammarFactory.is_supported(tokenizer.mistral):
                raise InvalidGrammarError("response_format", "this model's tokenizer does not support "
                                          "structured output (a Tekken tokenizer of version v11 or later is needed)")
            factory = _factories[tokenizer.model_dir] = GrammarFactory(tokenizer.mistral)
        return factory


class GrammarCompiler:
    """Checks grammars and compiles them into matchers over one tokenizer's vocabulary."""

    def __init__(self, tokenizer: llg.LLTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> GrammarCompiler:
        return cls(grammar_factory(tokenizer).llg_tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def check(self, lark: str) -> str:
        """'' for a grammar llguidance takes; else its complaint, without the listing of the grammar."""
        return first_lines(llg.LLMatcher.validate_grammar(lark, self.tokenizer))

    def matchers(self, grammar: Grammar, n: int) -> list[GrammarMatcher]:
        """`n` matchers at the start of the answer (past the grammar's prefix)."""
        matcher = llg.LLMatcher(self.tokenizer, grammar.lark, log_level=0)
        if matcher.is_error():
            raise InvalidGrammarError("grammar", first_lines(matcher.get_error()))
        if grammar.prefix and not matcher.consume_tokens(list(grammar.prefix)):
            raise InvalidGrammarError("grammar", f"the grammar refuses its prefix {list(grammar.prefix)}: "
                                      f"{first_lines(matcher.get_error())}")
        first = GrammarMatcher(matcher, self.vocab_size)
        return [first] + [first.copy() for _ in range(n - 1)]


def first_lines(message: str) -> str:
    """llguidance's error up to its listing of the grammar (`   3 | rule: ...`)."""
    kept = []
    for line in message.splitlines():
        head = line.strip().split("|", 1)[0].strip()
        if "|" in line and head.isdigit():
            break
        kept.append(line.rstrip())
    return " ".join(part.strip() for part in kept if part.strip())
