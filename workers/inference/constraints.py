"""Constrained decoding: a row whose tokens must follow a grammar (JSON mode, a JSON schema), with llguidance.

Why llguidance: it computes the allowed-token mask lazily from the grammar's lexer and an Earley parser over
the tokenizer's trie, in tens of microseconds per token on a CPU core, with no precompilation per schema
(xgrammar compiles each schema first, outlines-core builds a full index); it takes JSON schemas and Lark
grammars alike, needs neither torch nor CUDA itself, and is what vLLM, SGLang and llama.cpp use.

Each constrained row holds its own matcher. Before every sampling step the row's mask (allowed tokens) is
computed on the host and added to its logits as 0 / -inf; after the step the chosen token is consumed. A
grammar that is complete (the JSON value closed) ends the row with finish_reason "stop". The mask is a
plain tensor, so the dynamic path adds it with the other per-row terms and the static graph takes it in
its per-slot bias row: neither needs a graph of its own.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from app.core.contracts.grammar import GrammarError

BITS = torch.arange(32, dtype=torch.int32)


class TokenConstraint:
    """One row's grammar state (an llguidance matcher)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self) -> torch.Tensor:
        """0 for the tokens the grammar allows next, -inf for the rest: float32 [vocab] on the CPU."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        allowed = ((self._bitmask[0].unsqueeze(-1) >> BITS) & 1).flatten()[: self._vocab_size].bool()
        return torch.zeros(self._vocab_size).masked_fill_(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} does not follow the grammar: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the row ends here)."""
        return bool(self._matcher.is_stopped())


class Grammars:
    """Builds the matchers of one engine's tokenizer (its llguidance view is built once, on first use)."""

    def __init__(self, tokenizer: Any, vocab_size: int, tokenizer_lock: threading.Lock) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._ll_tokenizer: Any = None
        self._lock = tokenizer_lock  # the engine's: a fast tokenizer must not be used by two threads at once

    def constraint(self, grammar: str) -> TokenConstraint:
        """A fresh matcher for `grammar` (llguidance's form, e.g. from `app.core.contracts.grammar`)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._llguidance_tokenizer(), grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return TokenConstraint(matcher, self._vocab_size)

    def _llguidance_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size)
            return self._ll_tokenizer
