"""Hostile input on the inference worker, on the tiny model (CPU, no stack): a prompt far longer than the
context is refused after tokenizing a bounded prefix of it, and a chat template that the jinja sandbox
refuses is the client's 400, not a 500."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from app.core.contracts.inference import ChatMessage, GenerateMessage
from workers.inference import GenerationRequest, InferenceEngine, PromptTooLong
from workers.serving.generate import _as_error, _prompt_ids

HOSTILE_TEMPLATE = "{{ messages.__class__.__mro__[-1].__subclasses__() }}"
MAX_TOKENS = 16


class CountingTokenizer:
    """The engine's tokenizer, recording how many characters each call was given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.calls.append(len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[InferenceEngine]:
    with InferenceEngine(tiny_model, max_batch_size=4, max_adapters=1, device="cpu") as shared:
        yield shared


@pytest.fixture
def counted(engine: InferenceEngine) -> Iterator[CountingTokenizer]:
    original = engine.tokenizer
    engine.tokenizer = CountingTokenizer(original)
    try:
        yield engine.tokenizer
    finally:
        engine.tokenizer = original


def words(n: int) -> str:
    return " ".join(f"the cat likes a short story {i}" for i in range(n))


@pytest.mark.parametrize("chat", [False, True])
def test_a_huge_prompt_is_refused_after_tokenizing_a_bounded_prefix(
    engine: InferenceEngine, counted: CountingTokenizer, chat: bool
) -> None:
    huge = words(200_000)  # ~6 MB: tokenized whole, this took the worker's memory up by hundreds of MB
    assert len(huge) > 5_000_000
    messages = [ChatMessage(role="user", content=huge)] if chat else None
    with pytest.raises(PromptTooLong, match="context is 2048 tokens"):
        _prompt_ids(engine, messages, None if chat else huge, MAX_TOKENS)
    budget = 2 * 8 * (engine.max_context + 17)  # PREFIX_CHARS_PER_TOKEN x what fits, doubled at most once here
    assert counted.calls and max(counted.calls) <= budget, counted.calls


def test_bounded_encoding_never_refuses_a_prompt_that_fits_and_is_exact(engine: InferenceEngine) -> None:
    fits = engine.max_context - MAX_TOKENS
    texts = [words(n) for n in (1, 50, 200, 330, 400, 2000)]
    # ~10 characters per token: longer than the first prefix tried (8 per token), yet it fits.
    texts += [" assistant" * n for n in (1700, fits, fits + 1, 3000)]
    outcomes = set()
    for text in texts:
        whole = engine.encode_prompt(text)
        try:
            ids = _prompt_ids(engine, None, text, MAX_TOKENS)
        except PromptTooLong:
            assert len(whole) > fits, f"refused a prompt of {len(whole)} tokens, which fits"
            outcomes.add("refused early")
            continue
        assert ids == whole
        outcomes.add("fits" if len(ids) <= fits else "left to submit")
    assert outcomes == {"fits", "refused early", "left to submit"}, outcomes


def test_a_prompt_just_over_the_context_is_refused_exactly(engine: InferenceEngine) -> None:
    fits = engine.max_context - MAX_TOKENS
    just_over = " assistant" * (fits + 1)  # tokenized whole (short enough), then the exact check refuses it
    prompt_ids = _prompt_ids(engine, None, just_over, MAX_TOKENS)
    with pytest.raises(PromptTooLong, match=f"the prompt has {fits + 1} tokens") as refused:
        engine.submit(GenerationRequest(prompt_ids=prompt_ids, max_tokens=MAX_TOKENS, temperature=0.0))
    error = _as_error(refused.value, GenerateMessage(base_model="tiny", max_tokens=MAX_TOKENS, prompt=just_over))
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "prompt")


@pytest.fixture(scope="module")
def hostile_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a chat template (in tokenizer_config.json) that reaches for Python internals."""
    model = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("hostile") / "model"))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HOSTILE_TEMPLATE
    config_path.write_text(json.dumps(config))
    return model


def test_a_chat_template_the_sandbox_refuses_is_a_400(hostile_model: Path) -> None:
    request = GenerateMessage(
        base_model=str(hostile_model), max_tokens=4, messages=[ChatMessage(role="user", content="hi")]
    )
    with InferenceEngine(hostile_model, max_batch_size=1, max_adapters=1, device="cpu") as engine:
        assert engine.tokenizer.chat_template == HOSTILE_TEMPLATE
        with pytest.raises(SecurityError) as refused:
            engine.encode_chat([m.model_dump() for m in request.messages or []])
    error = _as_error(refused.value, request)
    assert (error.status, error.code, error.param) == (400, "invalid_request_error", "messages")
    assert "unsafe" in error.message
