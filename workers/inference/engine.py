"""`InferenceEngine`: one base model, LoRA adapters on top, and a background thread doing continuous batching.

Design
------
Callers (Celery worker threads) call `submit()`, which validates the request and queues it; a single loop
thread owns the model. Each loop iteration:

1. runs queued control operations (adapter load/unload), so the model is only ever changed between steps;
2. runs one chunk of the oldest score call, if any (`scoring.py`);
3. admits waiting requests into the running batch and decodes one token per running row (`scheduler.py`).

`loading.py` loads the model and tokenizer, `runner.py` runs the forwards (left padding, per-row adapters,
the KV cache of `kv.py`), `adapters.py` keeps the LoRA LRU. This module owns the loop thread and the lock
that callers share with it.

transformers 5 also ships continuous batching (`generate_batch` / `ContinuousBatchingManager` with paged
attention), but it flattens all sequences into one packed row, and peft's `adapter_names` selects adapters
per batch row, so mixing adapters would not work there; the padded `DynamicCache` approach works with any HF
causal LM whose cache is made of plain `DynamicLayer`s (checked when the engine starts).

Errors: a forward's exception fails only the work it was for (see `scheduler.py`, `scoring.py`). A bug in
the loop itself, or `close()`, fails everything still pending. A handle always ends with a result or an error.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from workers.inference.adapters import AdapterCache
from workers.inference.constraints import Grammars
from workers.inference.handle import GenerationHandle
from workers.inference.loading import default_device, default_dtype, load_model
from workers.inference.openmp import release_thread_pool
from workers.inference.request import (
    BASE_ADAPTER,
    EngineClosed,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    PromptTooLong,
    ScoreResult,
)
from workers.inference.runner import ModelRunner
from workers.inference.sampling import RowSampling
from workers.inference.scheduler import Decoder, Scheduler, SequenceState
from workers.inference.scoring import ScoreJob, Scorer, plan_chunks, prepare_items, set_exception, set_result
from workers.inference.static.decoder import StaticDecoder
from workers.inference.static.llama import unsupported_reason
from workers.inference.static.lora import check_adapter_targets
from workers.inference.stats import EngineStats
from workers.inference.text import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

T = TypeVar("T")
# "dynamic": the padded DynamicCache path (any causal LM); "static": KV slots + stacked LoRA, eager;
# "compiled": the static step under torch.compile (CUDA graphs on CUDA). See `static/decoder.py`.
DecodePath = Literal["dynamic", "static", "compiled"]
# Bounded tokenization of prompts (`InferenceEngine._encode`).
PREFIX_CHARS_PER_TOKEN = 8  # the first prefix tried: 8 characters per token that fits (text averages ~4)
PREFIX_SLACK_TOKENS = 16  # what cutting a text can change in its last tokens
PREFIX_CUT_LOOKBACK = 256  # characters looked back for a space to cut before


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What one loop iteration did; passed to the `on_step` hook (runs on the loop thread: keep it quick)."""

    step: int
    request_ids: tuple[str, ...]  # rows of this decode step, in batch order (empty if nothing was decoded)
    admitted: tuple[str, ...]  # requests prefilled in this iteration


class InferenceEngine:
    """Continuous-batching text generation for one base model and its LoRA adapters. See the module docstring."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int = 32,
        max_adapters: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_context: int | None = None,
        max_prefill_tokens: int = 16384,
        stats_window_s: float = 10.0,
        on_step: Callable[[StepInfo], None] | None = None,
        decode: DecodePath = "static",
        static_max_len: int = 4096,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = Path(model_path)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.device = torch.device(device or default_device())
        self.dtype = dtype or default_dtype(self.device)
        loaded = load_model(self.model_path, device=self.device, dtype=self.dtype, max_context=max_context)
        self.tokenizer: Any = loaded.tokenizer
        self.max_context = loaded.max_context
        self._vocab_size = loaded.vocab_size
        self._model_type = loaded.model_type
        self._parameters = loaded.parameters
        self._parameter_bytes = loaded.parameter_bytes
        self._tokenizer_lock = threading.Lock()  # fast tokenizers raise "Already borrowed" when shared by threads
        self._grammars = Grammars(self.tokenizer, self._vocab_size, self._tokenizer_lock)
        self._backend_decode = loaded.backend_decode
        self._token_text: dict[int, str] = {}  # decode([id]) of ids seen (`_detokenize`); at most the vocabulary
        self.decode_path = _choose_decode_path(decode, loaded.model)
        if self.decode_path != "dynamic":
            # KV slots are allocated for the whole context up front: bound it (see `static_max_len`).
            self.max_context = min(self.max_context, static_max_len)
        self._adapters = AdapterCache(
            loaded.model,
            max_adapters,
            device=self.device,
            validate=check_adapter_targets if self.decode_path != "dynamic" else None,
        )
        self._stats = EngineStats(stats_window_s)
        self._on_step = on_step

        # `_cond` guards `_control`, `_closed` and the queues callers append to (`_scheduler.waiting`,
        # `_scorer.queue`); the loop sleeps on it. The rest of the scheduler and scorer is the loop thread's.
        self._cond = threading.Condition()
        self._control: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._closed = False
        self._step = 0
        runner = ModelRunner(
            self._adapters, device=self.device, pad_id=loaded.pad_id, logits_to_keep=loaded.logits_to_keep
        )
        decoder: Decoder = runner
        if self.decode_path != "dynamic":
            decoder = StaticDecoder(
                runner,
                loaded.model,
                max_batch_size=max_batch_size,
                max_len=self.max_context,
                compiled=self.decode_path == "compiled",
            )
        self._scheduler = Scheduler(
            decoder,
            self._stats,
            self._cond,
            eos=loaded.eos,
            max_batch_size=max_batch_size,
            max_prefill_tokens=max_prefill_tokens,
        )
        self._scorer = Scorer(runner, self._stats)

        with torch.inference_mode():
            runner.probe()
            if isinstance(decoder, StaticDecoder) and decoder.compiled:
                decoder.warm_up()  # compiles every bucket now, not on the first requests
        # This thread's OpenMP workers would slow every parallel region of the loop thread (`openmp.py`).
        release_thread_pool()
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)
        self._thread.start()

    # --- public API --------------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The module each forward runs (the PeftModel once an adapter is loaded)."""
        return self._adapters.model

    def encode_prompt(self, text: str, *, max_tokens: int | None = None) -> list[int]:
        """Token ids of a plain-text prompt, with the tokenizer's usual special tokens (e.g. BOS).

        With `max_tokens` (the completion's), a prompt that cannot fit beside it raises `PromptTooLong`
        after tokenizing a bounded prefix of it, never the whole text (see `_encode`)."""
        with self._tokenizer_lock:
            return self._encode(text, add_special_tokens=True, max_tokens=max_tokens)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of `messages` rendered with the tokenizer's chat template, ready for the assistant turn.
        `max_tokens` as for `encode_prompt`. A template the sandbox refuses raises jinja2's `SecurityError`.
        `tools` (function definitions) are rendered by the template; a template that has no place for them
        raises ValueError, rather than the model never learning of them."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"the tokenizer of {self.model_path} has no chat template")
        if tools and "tools" not in str(template):
            raise ValueError("tools: the model's chat template does not render tools, so it cannot call them")
        with self._tokenizer_lock:
            rendered = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tools=[dict(t) for t in tools] if tools else None,
                tokenize=False,
                add_generation_prompt=True,
            )
            # The template already wrote any BOS/system tokens it wants; adding them again would double them.
            return self._encode(rendered, add_special_tokens=False, max_tokens=max_tokens)

    def _encode(self, text: str, *, add_special_tokens: bool, max_tokens: int | None) -> list[int]:
        """Tokenize `text`; with `max_tokens`, without ever tokenizing much more than the context can hold.

        Tokenizing costs memory and time in proportion to the text (a 10 MB prompt took a worker from 634 MB
        to 1.7 GB and 9.5 s), so a long text is tokenized a prefix at a time: the first prefix has
        `PREFIX_CHARS_PER_TOKEN` characters per token that would still fit, and each next one twice as many.
        Once a prefix has more tokens than fit (plus `PREFIX_SLACK_TOKENS`), the whole text has too: a prefix
        is cut before a space, so the words it holds tokenize as they do in the whole text, and the slack
        covers what a cut inside a word can change. A text that is tokenized whole gets the exact check in
        `submit`. No bound on characters per token is assumed (a token may span many characters, or one
        character several tokens); the doubling finds out, and the API caps the characters anyway."""
        tokenize = self.tokenizer
        if max_tokens is None:
            return list(tokenize(text, add_special_tokens=add_special_tokens)["input_ids"])
        fits = max(self.max_context - max_tokens, 0)
        budget = PREFIX_CHARS_PER_TOKEN * (fits + PREFIX_SLACK_TOKENS + 1)
        while budget < len(text):
            cut = text.rfind(" ", budget - PREFIX_CUT_LOOKBACK, budget)
            prefix = text[: cut if cut > 0 else budget]
            counted = len(tokenize(prefix, add_special_tokens=add_special_tokens)["input_ids"])
            if counted > fits + PREFIX_SLACK_TOKENS:
                raise PromptTooLong(
                    f"the prompt has at least {counted - PREFIX_SLACK_TOKENS} tokens and max_tokens is "
                    f"{max_tokens}, but the model's context is {self.max_context} tokens"
                )
            budget *= 2
        return list(tokenize(text, add_special_tokens=add_special_tokens)["input_ids"])

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue `request`; returns at once with a handle to stream from or wait on. Thread-safe.

        Raises `PromptTooLong`, `ValueError` for bad arguments, `AdapterNotLoaded`, `EngineClosed`.
        """
        request.validate(self._vocab_size)
        prompt = [int(t) for t in request.prompt_ids]
        room = self.max_context - len(prompt)
        wanted = request.max_tokens if request.max_tokens is not None else 1
        if wanted > room:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens and max_tokens is {request.max_tokens}, but the model's "
                f"context is {self.max_context} tokens"
            )
        self._adapters.check_available(request.adapter, request.adapter_path)
        sequence = SequenceState(
            request=request,
            handle=GenerationHandle(request.request_id, len(prompt)),
            prompt=prompt,
            max_new=request.max_tokens if request.max_tokens is not None else room,
            sampling=RowSampling.create(
                request.temperature,
                request.top_p,
                request.seed,
                presence=request.presence_penalty,
                frequency=request.frequency_penalty,
                top=request.top_logprobs,
                bias=tuple((int(token), float(value)) for token, value in request.logit_bias.items()),
                constraint=self._grammars.constraint(request.grammar) if request.grammar else None,
            ),
            decoder=IncrementalDecoder(self._detokenize),
            matcher=StopMatcher(request.stop),
        )
        with self._cond:
            if self._closed:
                raise EngineClosed("the inference engine is closed")
            self._scheduler.waiting.append(sequence)
            self._cond.notify()
        return sequence.handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """`submit` and wait for the result."""
        return self.submit(request).result(timeout)

    def load_adapter(self, name: str, path: str | Path) -> list[str]:
        """Load adapter `name` now (evicting idle LRU adapters if full); returns the evicted names."""
        return self._call_in_loop(lambda: self._adapters.ensure(name, path, in_use=self._adapters_in_use()))

    def unload_adapter(self, name: str) -> None:
        """Remove adapter `name`; `AdapterInUse` if a running request or score call uses it, `AdapterNotLoaded` if
        it is not loaded."""
        self._call_in_loop(lambda: self._adapters.unload(name, in_use=self._adapters_in_use()))

    def score(
        self,
        items: Iterable[tuple[Sequence[int], Sequence[int]]],
        adapter: str | None = None,
        adapter_path: str | Path | None = None,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Teacher-forced negative log-likelihood of each `(prompt_ids, completion_ids)` item, in item order.

        For evaluations and A/B tests: `ScoreResult.nll_sum` sums -log p(completion token | prompt and the
        completion tokens before it) over the completion (natural log, float32 log-softmax, float64 sum), and
        `ScoreResult.tokens` is the number of completion tokens scored (all of them). `adapter` / `adapter_path`
        work as in `GenerationRequest` (None: the base model; the adapter is loaded through the LRU if needed).
        Runs on the engine's loop thread, one chunk of up to `max_batch_size` items per loop iteration, so
        generation goes on meanwhile and the outputs of running requests do not change.

        Each prompt needs at least one token (e.g. BOS: the first completion token is predicted from it). An
        item longer than `max_context` has its prompt cut from the left to fit (`prompt_tokens_dropped` says
        how many tokens), keeping at least one prompt token; a completion that alone needs more than
        `max_context - 1` tokens raises `PromptTooLong` before anything runs. An empty completion scores
        `ScoreResult(0.0, 0)`.

        Raises `ValueError` for bad items or arguments, `PromptTooLong`, the adapter errors of `load_adapter`
        (`AdapterNotLoaded`, `AdapterMismatch`, ...), `GenerationError` if a forward fails (`__cause__` holds the
        original), `EngineClosed`, and `TimeoutError` after `timeout` seconds (the rest of the work is dropped).
        """
        if adapter == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved; use adapter=None for the base model")
        if adapter_path is not None and adapter is None:
            raise ValueError("adapter_path given without an adapter name")
        self._adapters.check_available(adapter, adapter_path)
        prepared, dropped = prepare_items(items, vocab_size=self._vocab_size, max_context=self.max_context)
        results = [ScoreResult(0.0, 0, d) for d in dropped]
        todo = [i for i, (_, completion) in enumerate(prepared) if completion]
        if not todo:
            return results
        chunks = plan_chunks(
            prepared,
            todo,
            max_batch_size=self.max_batch_size,
            max_prefill_tokens=self.max_prefill_tokens,
            vocab_size=self._vocab_size,
        )
        future: Future[list[float]] = Future()
        job = ScoreJob(
            items=prepared,
            chunks=deque(chunks),
            adapter=adapter or BASE_ADAPTER,
            adapter_path=Path(adapter_path) if adapter_path is not None else None,
            future=future,
            sums=[0.0] * len(prepared),
        )
        with self._cond:
            if self._closed:
                raise EngineClosed("the inference engine is closed")
            self._scorer.queue.append(job)
            self._cond.notify()
        try:
            sums = future.result(timeout)
        except TimeoutError:
            future.cancel()  # the loop drops a cancelled job at its next chunk
            raise TimeoutError(f"scoring {len(prepared)} item(s) did not finish within {timeout}s") from None
        return [
            ScoreResult(total, len(completion), d)
            for total, (_, completion), d in zip(sums, prepared, dropped, strict=True)
        ]

    def info(self) -> dict[str, Any]:
        """What this engine serves (fixed at start-up): base model, dtype, device, context and batch limits, size."""
        return {
            "model_path": str(self.model_path),
            "model_type": self._model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_context": self.max_context,
            "vocab_size": self._vocab_size,
            "max_batch_size": self.max_batch_size,
            "max_prefill_tokens": self.max_prefill_tokens,
            "decode_path": self.decode_path,
            "adapter_capacity": self._adapters.capacity,
            "parameters": self._parameters,
            "parameter_bytes": self._parameter_bytes,  # base model weights, adapters not included
        }

    def stats(self) -> dict[str, Any]:
        """A snapshot: adapters, queue sizes, batch-size histogram (size -> decode steps), tokens, tokens/s."""
        snapshot = self._stats.snapshot()
        with self._cond:
            waiting = len(self._scheduler.waiting)
        snapshot.update(
            loaded_adapters=self._adapters.loaded(),
            adapter_capacity=self._adapters.capacity,
            running=len(self._scheduler.running),
            waiting=waiting,
            max_batch_size=self.max_batch_size,
        )
        return snapshot

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop thread and fail every request that has not finished. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._fail_everything(EngineClosed("the inference engine was closed"))

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the loop ----------------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        """Whether the loop has anything to do (the caller holds `_cond`)."""
        scheduler, scorer = self._scheduler, self._scorer
        return bool(
            self._closed or scheduler.waiting or scheduler.running or self._control or scorer.queue or scorer.jobs
        )

    def _run(self) -> None:
        scheduler, scorer = self._scheduler, self._scorer
        holds_pool = False  # whether this thread has opened OpenMP regions since it last went idle
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        idle = not self._has_work()
                    if idle and holds_pool:
                        # An idle engine's OpenMP workers still count against every pool in the process, so
                        # the other engines of a multi-model worker would take libgomp's slow path
                        # (`openmp.py`); the next request builds the pool again (tens of microseconds).
                        release_thread_pool()
                        holds_pool = False
                    with self._cond:
                        while not self._has_work():
                            self._cond.wait()
                        holds_pool = True
                        if self._closed:
                            return
                        control = list(self._control)
                        self._control.clear()
                        scorer.take_queued()
                        admitted = scheduler.take_waiting()
                    for operation, future in control:
                        _run_into(operation, future)
                    if scorer.jobs:
                        scorer.step(busy=scheduler.adapters_in_use() - {BASE_ADAPTER})
                    self._iterate(admitted)
        except BaseException as exc:  # a bug in the loop itself: fail loudly, never leave callers waiting
            log.exception("inference engine loop crashed")
            error = EngineClosed(f"the inference engine loop crashed: {exc!r}")
            error.__cause__ = exc
            with self._cond:
                self._closed = True
            self._fail_everything(error)
        finally:
            self._fail_everything(EngineClosed("the inference engine was closed"))

    def _iterate(self, admitted: list[SequenceState]) -> None:
        decoded, ready = self._scheduler.step(admitted, busy=self._scorer.adapters_in_use())
        self._step += 1
        if self._on_step is not None and (decoded or ready):
            try:
                self._on_step(StepInfo(self._step, tuple(decoded), tuple(s.request.request_id for s in ready)))
            except Exception:
                log.exception("on_step hook failed")

    def _fail_everything(self, error: GenerationError) -> None:
        with self._cond:
            pending = self._scheduler.take_all()
            control = list(self._control)
            scores = self._scorer.take_all()
            self._control.clear()
        for sequence in pending:
            if not sequence.handle.done():
                sequence.handle.fail(error)
                self._stats.record_finished(ok=False)
        for future in [f for _, f in control] + [job.future for job in scores]:
            set_exception(future, error)

    # --- helpers -----------------------------------------------------------------------------------------

    def _call_in_loop(self, operation: Callable[[], T]) -> T:
        """Run `operation` on the loop thread between steps (the only place the model may change)."""
        if threading.current_thread() is self._thread:
            return operation()
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the inference engine is closed")
            self._control.append((operation, future))
            self._cond.notify()
        return future.result()

    def _adapters_in_use(self) -> set[str]:
        """Adapters that must not be evicted or unloaded: running requests' and started score calls'."""
        return (self._scheduler.adapters_in_use() | self._scorer.adapters_in_use()) - {BASE_ADAPTER}

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """The text of each token on its own, special tokens included (for log-probability reports)."""
        with self._tokenizer_lock:
            return [str(self.tokenizer.decode([int(t)], skip_special_tokens=False)) for t in ids]

    def _detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens. Runs twice per generated token (streaming): keep it lean.
        One id alone (the left context of most streaming windows) is looked up once per token id."""
        if len(ids) == 1:
            token = ids[0]
            text = self._token_text.get(token)
            if text is None:
                text = self._token_text[token] = self._decode_ids(ids)
            return text
        return self._decode_ids(ids)

    def _decode_ids(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            if self._backend_decode is not None:
                return self._backend_decode(list(ids), skip_special_tokens=True)
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _choose_decode_path(wanted: DecodePath, model: nn.Module) -> DecodePath:
    """`wanted`, or "dynamic" (logged) when the model is not one the static path covers."""
    if wanted == "dynamic":
        return wanted
    reason = unsupported_reason(model)
    if reason is not None:
        log.warning("decode path %r unavailable (%s); using the dynamic path", wanted, reason)
        return "dynamic"
    return wanted


def _run_into(operation: Callable[[], Any], future: Future[Any]) -> None:
    try:
        result = operation()
    except Exception as exc:
        set_exception(future, exc)
    else:
        set_result(future, result)
