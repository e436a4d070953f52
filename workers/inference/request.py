"""What a caller hands the engine (`GenerationRequest`), what it gets back (`GenerationResult`), and the errors."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]

# peft's name for "no adapter" in a mixed-adapter batch (see `LoraLayer._mixed_batch_forward`).
BASE_ADAPTER = "__base__"


class PromptTooLong(ValueError):
    """The prompt plus `max_tokens` does not fit in the model's context window."""


class GenerationError(RuntimeError):
    """Generation failed inside the engine; `__cause__` holds the original exception."""


class EngineClosed(GenerationError):
    """The engine was closed (or its loop died) before the request finished."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One completion to generate.

    `prompt_ids` are already tokenized (render chat templates with `InferenceEngine.encode_chat`).
    `max_tokens=None` means "until EOS, a stop string or the end of the context window".
    `temperature=0` is greedy decoding; otherwise `top_p` nucleus sampling driven by a per-request generator
    seeded with `seed` (random when None), so a seeded request samples the same text whatever else is batched.
    `adapter` names a LoRA adapter of the engine's base model (None: the base model itself); with
    `adapter_path` the engine loads it on demand, without it the adapter must already be loaded.
    `presence_penalty` / `frequency_penalty` follow OpenAI's definition over the tokens generated so far:
    each logit is lowered by `frequency_penalty * count + presence_penalty * (count > 0)` before the token is
    chosen (greedy rows too); `token_logprobs` stay those of the model's own distribution.
    `logit_bias` adds its value to the logit of its token id before the token is chosen (-100 bans a token,
    +100 all but forces it), as OpenAI defines it.
    `grammar` (an llguidance grammar, e.g. from `app.core.contracts.grammar.json_schema_grammar`) restricts every
    token to what the grammar allows next; the request ends ("stop") once the grammar is complete.
    `ignore_eos=True` keeps generating past EOS tokens (stop strings and `max_tokens` still end the request):
    for benchmarks that must generate exactly `max_tokens` tokens.
    """

    prompt_ids: Sequence[int]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    adapter: str | None = None
    adapter_path: str | Path | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None

    def validate(self, vocab_size: int) -> None:
        """Reject bad arguments at submit time: inside the loop they would fail every request in the batch."""
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty")
        if any(not 0 <= int(t) < vocab_size for t in self.prompt_ids):
            raise ValueError(f"prompt_ids has token ids outside the vocabulary [0, {vocab_size})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not 0 <= int(token) < vocab_size or not -100 <= bias <= 100 for token, bias in self.logit_bias.items()):
            raise ValueError(f"logit_bias: token ids in [0, {vocab_size}) and biases in [-100, 100]")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            raise TypeError("stop must be a sequence of strings, not a string")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.adapter == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved; use adapter=None for the base model")
        if self.adapter_path is not None and self.adapter is None:
            raise ValueError("adapter_path given without an adapter name")


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The final outcome. `completion_tokens` counts every sampled token, the EOS or stop-completing one included."""

    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]
    # Natural-log probability of each token in `token_ids` under the model's distribution at its step (before
    # temperature and top-p), computed in float32 from the same logits the token was chosen from.
    token_logprobs: tuple[float, ...] = ()
    # With `top_logprobs=k`: per token, the k most likely tokens at that step and their log-probabilities.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """Teacher-forced score of one completion given its prompt (`InferenceEngine.score`).

    `nll_sum` is the sum over the completion tokens of -log p(token | everything before it), in nats, and
    `tokens` the number of completion tokens scored, so `nll_sum / tokens` is the mean loss and
    `exp(total nll_sum / total tokens)` the perplexity of a dataset. `prompt_tokens_dropped` counts prompt tokens
    cut from the left to fit the context window (0 when the item fit).
    """

    nll_sum: float
    tokens: int
    prompt_tokens_dropped: int = 0
