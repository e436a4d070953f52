"""`InferenceEngine`: one base model, LoRA adapters on top, and a background thread doing continuous batching.

Design
------
Callers (Celery worker threads) call `submit()`, which validates the request and queues it; a single loop
thread owns the model. Each loop iteration:

1. runs queued control operations (adapter load/unload), so the model is only ever changed between steps;
2. admits waiting requests while the batch has room (`max_batch_size`, and `max_prefill_tokens` of padded
   prompt per step), loads their adapters through the LRU in `adapters.py`, prefills them together
   (left-padded, explicit position ids) into a fresh cache, samples their first token, and merges that cache
   into the running one (`kv.PaddedKV`: the shorter side is left-padded along the sequence axis);
3. runs one decode step for every running row: the last sampled token of each row, its own position id,
   and the batch mask grown by one column;
4. streams the new text of each row (`text.py`), and removes finished rows right away (`index_select` on
   the cache, then the columns no remaining row uses are trimmed off the left).

So a new request joins at the next step instead of waiting for the batch to drain, and a finished one frees
its slot immediately. Rows of one forward may use different adapters: once an adapter is loaded the model is
a peft `PeftModelForCausalLM` and every forward passes `adapter_names=[...]` with one entry per row
("__base__" for the base model); peft computes the base layer once for the whole batch and adds each LoRA
delta to its own rows only, so a row gets what it would get alone (up to float rounding of batched kernels).

transformers 5 also ships continuous batching (`generate_batch` / `ContinuousBatchingManager` with paged
attention), but it flattens all sequences into one packed row, and peft's `adapter_names` selects adapters
per batch row, so mixing adapters would not work there; the padded `DynamicCache` approach works with any HF
causal LM whose cache is made of plain `DynamicLayer`s (checked when the engine starts).

Scoring (`score()`, teacher-forced NLL of completions for evaluations and A/B tests) shares the loop too:
a score call is split into chunks (similar lengths together, left-padded, no KV cache) and the loop runs one
chunk per iteration, between the control operations and the prefill/decode step. So the model is never used
from two threads, generation keeps streaming while a long evaluation runs, and the running batch's cache is
never touched. While a score call runs, its adapter counts as in use (the LRU will not evict it).

Errors: an exception in a prefill fails the requests being admitted; one in a decode step fails every
running request (the cache may be half-updated) and the loop carries on with an empty batch. A bug in the
loop itself, or `close()`, fails everything still pending. A handle always ends with a result or an error.

Not done yet: the GPU lever
---------------------------
Every decode step here re-launches the whole model eagerly and `DynamicCache` re-concatenates each layer's
keys and values (O(batch x length) copies per step). On an H100 with a 7B model at batch 64, that per-step
overhead (kernel launches, Python, allocation) dominates the step, not the FLOPs. The fix is a static KV
cache (`transformers.StaticCache`-style: preallocated (max_batch, heads, max_len, head_dim) slots, a row
keeps its slot while it runs, writes at per-row positions instead of concatenating) plus capturing the
decode step in CUDA graphs (`torch.compile(mode="reduce-overhead")` or manual `torch.cuda.CUDAGraph`) for a
few padded batch sizes (1, 2, 4, ..., 64). Mixed adapters would then need the per-row LoRA as graph-friendly
ops (a gathered per-row A/B bmm, as in punica/S-LoRA) instead of peft's Python loop over sub-batches. On CPU
the dynamic approach is fine: the step is compute-bound.

Per-step Python already trimmed: adapter names reach the LoRA layers through hooks registered once per adapter
change (`adapters.py`), not by peft walking the model every forward, and streaming detokenization calls the
Rust decoder directly. What remains with adapters is peft's `_mixed_batch_forward` (per LoRA layer: Python
index lists per adapter, advanced indexing, index_put); replacing it with per-step device index tensors and
`index_select`/`index_add_` (or a punica-style kernel) is the next step (`benchmarks/inference_engine.py
--adapters 3` measures it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from workers.inference.adapters import AdapterCache, AdapterCapacityFull, AdapterNotLoaded
from workers.inference.handle import GenerationHandle
from workers.inference.kv import PaddedKV, check_supported, new_cache
from workers.inference.request import (
    BASE_ADAPTER,
    EngineClosed,
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    PromptTooLong,
    ScoreResult,
)
from workers.inference.sampling import RowSampling, next_tokens
from workers.inference.stats import EngineStats
from workers.inference.text import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

T = TypeVar("T")

# At most this many logit elements (rows x scored positions x vocab) per scoring chunk: the float32 logits and
# their log-softmax are the biggest tensors of a scoring forward (2**27 elements: 512 MiB each in float32).
SCORE_LOGITS_BUDGET = 1 << 27
_IGNORE = -100  # cross_entropy's ignore_index


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What one loop iteration did; passed to the `on_step` hook (runs on the loop thread: keep it quick)."""

    step: int
    request_ids: tuple[str, ...]  # rows of this decode step, in batch order (empty if nothing was decoded)
    admitted: tuple[str, ...]  # requests prefilled in this iteration


@dataclass(eq=False)
class _Sequence:
    """A request's state inside the engine."""

    request: GenerationRequest
    handle: GenerationHandle
    prompt: list[int]
    max_new: int
    sampling: RowSampling
    decoder: IncrementalDecoder
    matcher: StopMatcher
    generated: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model
    done: bool = False  # finished or failed (its handle may be released only at the end of the iteration)

    @property
    def adapter(self) -> str:
        return self.request.adapter or BASE_ADAPTER


@dataclass(eq=False)
class _ScoreJob:
    """One `score()` call inside the engine: its items, the chunks still to run, and the caller's future."""

    items: list[tuple[list[int], list[int]]]  # (prompt, completion), prompt already cut to fit the context
    chunks: deque[list[int]]  # indices into `items`, one list per forward
    adapter: str  # BASE_ADAPTER for the base model
    adapter_path: Path | None
    future: Future[list[float]]  # the NLL sum of each item
    sums: list[float]
    started: bool = False  # its adapter is resolved and counts as in use until the job ends


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
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = Path(model_path)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or _default_dtype(self.device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)
        base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            self.model_path, use_safetensors=True, dtype=self.dtype, trust_remote_code=False
        )
        base = base.to(self.device).eval()  # type: ignore[arg-type]  # transformers types `to` oddly
        self.max_context = max_context or _context_length(base, self.tokenizer)
        self._vocab_size = int(base.config.get_text_config(decoder=True).vocab_size)
        self._eos = _eos_ids(base, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self._eos, default=0))
        # Computing logits only for the last position saves a (prompt x vocab) tensor per prefill.
        self._logits_to_keep = "logits_to_keep" in _forward_parameters(base)
        self._model_type = str(getattr(base.config, "model_type", "") or "")
        self._parameters = sum(p.numel() for p in base.parameters())
        self._parameter_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        self._tokenizer_lock = threading.Lock()  # fast tokenizers raise "Already borrowed" when shared by threads
        self._backend_decode = _backend_decode(self.tokenizer)
        self._adapters = AdapterCache(base, max_adapters, device=self.device)
        self._stats = EngineStats(stats_window_s)
        self._on_step = on_step

        # Loop state. `_running` and `_kv` belong to the loop thread; the others are guarded by `_cond`.
        self._running: list[_Sequence] = []
        self._kv: PaddedKV | None = None
        self._finished: list[tuple[GenerationHandle, GenerationResult]] = []
        self._step = 0
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._control: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._score_queue: deque[_ScoreJob] = deque()
        self._scoring: deque[_ScoreJob] = deque()  # loop thread only: jobs taken from `_score_queue`, FIFO
        self._closed = False

        with torch.inference_mode():
            self._probe()
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)
        self._thread.start()

    # --- public API --------------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The module each forward runs (the PeftModel once an adapter is loaded)."""
        return self._adapters.model

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt, with the tokenizer's usual special tokens (e.g. BOS)."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of `messages` rendered with the tokenizer's chat template, ready for the assistant turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model_path} has no chat template")
        with self._tokenizer_lock:
            rendered = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
            )
            # The template already wrote any BOS/system tokens it wants; adding them again would double them.
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

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
        if request.adapter is not None and request.adapter_path is None and request.adapter not in self._adapters:
            raise AdapterNotLoaded(f"adapter {request.adapter!r} is not loaded and no adapter_path was given")
        sequence = _Sequence(
            request=request,
            handle=GenerationHandle(request.request_id, len(prompt)),
            prompt=prompt,
            max_new=request.max_tokens if request.max_tokens is not None else room,
            sampling=RowSampling.create(request.temperature, request.top_p, request.seed),
            decoder=IncrementalDecoder(self._detokenize),
            matcher=StopMatcher(request.stop),
        )
        with self._cond:
            if self._closed:
                raise EngineClosed("the inference engine is closed")
            self._waiting.append(sequence)
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
        if adapter is not None and adapter_path is None and adapter not in self._adapters:
            raise AdapterNotLoaded(f"adapter {adapter!r} is not loaded and no adapter_path was given")
        prepared, dropped = self._prepare_score_items(items)
        results = [ScoreResult(0.0, 0, d) for d in dropped]
        todo = [i for i, (_, completion) in enumerate(prepared) if completion]
        if not todo:
            return results
        future: Future[list[float]] = Future()
        job = _ScoreJob(
            items=prepared,
            chunks=deque(self._score_chunks(prepared, todo)),
            adapter=adapter or BASE_ADAPTER,
            adapter_path=Path(adapter_path) if adapter_path is not None else None,
            future=future,
            sums=[0.0] * len(prepared),
        )
        with self._cond:
            if self._closed:
                raise EngineClosed("the inference engine is closed")
            self._score_queue.append(job)
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
            "adapter_capacity": self._adapters.capacity,
            "parameters": self._parameters,
            "parameter_bytes": self._parameter_bytes,  # base model weights, adapters not included
        }

    def stats(self) -> dict[str, Any]:
        """A snapshot: adapters, queue sizes, batch-size histogram (size -> decode steps), tokens, tokens/s."""
        snapshot = self._stats.snapshot()
        with self._cond:
            waiting = len(self._waiting)
        snapshot.update(
            loaded_adapters=self._adapters.loaded(),
            adapter_capacity=self._adapters.capacity,
            running=len(self._running),
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

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (
                            self._closed
                            or self._waiting
                            or self._running
                            or self._control
                            or self._score_queue
                            or self._scoring
                        ):
                            self._cond.wait()
                        if self._closed:
                            return
                        control = list(self._control)
                        self._control.clear()
                        self._scoring.extend(self._score_queue)
                        self._score_queue.clear()
                        admitted = self._take_waiting()
                    for operation, future in control:
                        _run_into(operation, future)
                    if self._scoring:
                        self._score_step()
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

    def _take_waiting(self) -> list[_Sequence]:
        """Pop the requests to admit this iteration (called with `_cond` held)."""
        taken: list[_Sequence] = []
        longest = 0
        while self._waiting and len(self._running) + len(taken) < self.max_batch_size:
            candidate = max(longest, len(self._waiting[0].prompt))
            if taken and candidate * (len(taken) + 1) > self.max_prefill_tokens:
                break
            taken.append(self._waiting.popleft())
            longest = candidate
        return taken

    def _iterate(self, admitted: list[_Sequence]) -> None:
        ready: list[_Sequence] = []
        decoded: list[str] = []
        try:
            self._drop_cancelled()
            admitted = [s for s in admitted if not self._finish_if_cancelled(s)]
            ready = self._resolve_adapters(admitted)
            if ready:
                self._prefill(ready)
            decoded = [s.request.request_id for s in self._running]
            if self._running:
                self._decode()
        except Exception as exc:
            # Outside the forward passes (e.g. out of memory while merging caches): the batch state cannot be
            # trusted any more, so fail what it holds and carry on with an empty batch.
            lost = [s for s in dict.fromkeys(self._running + ready) if not s.done]
            self._running, self._kv = [], None
            self._fail(lost, exc)
        finally:
            self._publish_finished()
        self._step += 1
        if self._on_step is not None and (decoded or ready):
            try:
                self._on_step(StepInfo(self._step, tuple(decoded), tuple(s.request.request_id for s in ready)))
            except Exception:
                log.exception("on_step hook failed")

    def _resolve_adapters(self, admitted: list[_Sequence]) -> list[_Sequence]:
        """Load the adapters `admitted` needs; requeue those that must wait for a free slot, fail bad ones."""
        ready: list[_Sequence] = []
        deferred: list[_Sequence] = []
        for sequence in admitted:
            request = sequence.request
            try:
                if request.adapter is None:
                    pass
                elif request.adapter_path is not None:
                    in_use = self._adapters_in_use() | {s.adapter for s in ready}
                    self._adapters.ensure(request.adapter, request.adapter_path, in_use=in_use)
                elif request.adapter in self._adapters:
                    self._adapters.touch(request.adapter)
                else:
                    raise AdapterNotLoaded(f"adapter {request.adapter!r} was unloaded before the request started")
            except AdapterCapacityFull:
                deferred.append(sequence)
                continue
            except Exception as exc:
                self._fail([sequence], exc)
                continue
            ready.append(sequence)
        if deferred:
            with self._cond:
                self._waiting.extendleft(reversed(deferred))
        return ready

    def _prefill(self, sequences: list[_Sequence]) -> None:
        """Run the prompts of `sequences` together, sample their first tokens and merge them into the batch."""
        try:
            length = max(len(s.prompt) for s in sequences)
            ids = torch.full((len(sequences), length), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(sequences), length), dtype=torch.long)
            for row, sequence in enumerate(sequences):
                ids[row, length - len(sequence.prompt) :] = torch.tensor(sequence.prompt)
                mask[row, length - len(sequence.prompt) :] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
            cache = new_cache()
            logits = self._forward(ids, mask, positions, cache, [s.adapter for s in sequences])
            check_supported(cache, length)
            tokens = next_tokens(logits, [s.sampling for s in sequences])
        except Exception as exc:
            self._fail(sequences, exc)
            return
        self._stats.record_prefill(len(sequences), len(sequences))
        keep = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens, strict=True)):
            sequence.position = len(sequence.prompt)
            if not self._accept(sequence, token):
                keep.append(row)
        if not keep:
            return
        joined = PaddedKV(cache, mask)
        if len(keep) < len(sequences):
            joined.select(keep)
        if self._kv is None:
            self._kv = joined
        else:
            self._kv.merge(joined)
        self._running.extend(sequences[row] for row in keep)

    def _decode(self) -> None:
        """One token for every running row."""
        rows = self._running
        assert self._kv is not None and self._kv.batch_size == len(rows)
        try:
            ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.device)
            positions = torch.tensor([[s.position] for s in rows], dtype=torch.long, device=self.device)
            mask = self._kv.grow()
            logits = self._forward(ids, mask, positions, self._kv.cache, [s.adapter for s in rows])
            tokens = next_tokens(logits, [s.sampling for s in rows])
        except Exception as exc:
            # The cache may hold this step for some layers only: the whole batch is lost.
            self._running, self._kv = [], None
            self._fail(rows, exc)
            return
        self._stats.record_decode(len(rows), len(rows))
        keep = []
        for row, (sequence, token) in enumerate(zip(rows, tokens, strict=True)):
            sequence.position += 1
            if not self._accept(sequence, token):
                keep.append(row)
        if len(keep) < len(rows):
            self._retain(keep)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        adapters: list[str],
    ) -> torch.Tensor:
        """Logits of the last position of each row, as float32 (batch, vocab)."""
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "past_key_values": cache,
            "use_cache": True,
        }
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = self._adapters.forward(adapters, **kwargs)
        return output.logits[:, -1, :].float()

    def _accept(self, sequence: _Sequence, token: int) -> bool:
        """Record a sampled token and stream its text; True when the sequence finished (and was resolved)."""
        try:
            sequence.generated.append(token)
            if token in self._eos and not sequence.request.ignore_eos:
                return self._finish(sequence, "stop")
            sequence.handle.push(sequence.matcher.feed(sequence.decoder.push(token)))
            if sequence.matcher.stopped:
                return self._finish(sequence, "stop")
            if len(sequence.generated) >= sequence.max_new:
                return self._finish(sequence, "length")
            return False
        except Exception as exc:  # e.g. the tokenizer failing on this sequence: it alone fails
            self._fail([sequence], exc)
            return True

    def _finish(self, sequence: _Sequence, reason: FinishReason) -> bool:
        matcher = sequence.matcher
        if not matcher.stopped:
            sequence.handle.push(matcher.feed(sequence.decoder.flush()))
            if matcher.stopped:  # the held-back tail completed a stop string
                reason = "stop"
            else:
                sequence.handle.push(matcher.finish())
        result = GenerationResult(
            request_id=sequence.request.request_id,
            text=matcher.text,
            finish_reason=reason,
            prompt_tokens=len(sequence.prompt),
            completion_tokens=len(sequence.generated),
            token_ids=tuple(sequence.generated),
        )
        sequence.done = True
        self._stats.record_finished(ok=True)
        self._finished.append((sequence.handle, result))
        return True

    def _publish_finished(self) -> None:
        """Release the callers of finished requests, once the batch no longer holds them (so `stats()` agrees)."""
        finished, self._finished = self._finished, []
        for handle, result in finished:
            handle.finish(result)

    def _finish_if_cancelled(self, sequence: _Sequence) -> bool:
        return sequence.handle.cancelled and self._finish(sequence, "cancelled")

    def _drop_cancelled(self) -> None:
        keep = [row for row, s in enumerate(self._running) if not self._finish_if_cancelled(s)]
        if len(keep) < len(self._running):
            self._retain(keep)

    def _retain(self, rows: list[int]) -> None:
        """Keep only `rows` of the running batch (finished ones leave right away)."""
        self._running = [self._running[row] for row in rows]
        if not rows:
            self._kv = None
        else:
            assert self._kv is not None
            self._kv.select(rows)

    def _fail(self, sequences: list[_Sequence], exc: BaseException) -> None:
        if not sequences:
            return
        log.error("generation failed for %d request(s): %r", len(sequences), exc, exc_info=exc)
        for sequence in sequences:
            sequence.done = True
            error = exc if isinstance(exc, GenerationError) else GenerationError(f"generation failed: {exc!r}")
            if error is not exc:
                error.__cause__ = exc
            sequence.handle.fail(error)
            self._stats.record_finished(ok=False)

    def _fail_everything(self, error: GenerationError) -> None:
        with self._cond:
            pending = list(self._waiting) + list(self._running)
            control = list(self._control)
            scores = list(self._score_queue) + list(self._scoring)
            self._waiting.clear()
            self._control.clear()
            self._score_queue.clear()
        for sequence in pending:
            if not sequence.handle.done():
                sequence.handle.fail(error)
                self._stats.record_finished(ok=False)
        for future in [f for _, f in control] + [job.future for job in scores]:
            _set_exception(future, error)

    # --- scoring -----------------------------------------------------------------------------------------

    def _prepare_score_items(
        self, items: Iterable[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        """Validate and copy the items (caller thread); cut long prompts from the left. Returns items, cuts."""
        prepared: list[tuple[list[int], list[int]]] = []
        dropped: list[int] = []
        for index, item in enumerate(items):
            prompt_ids, completion_ids = item
            prompt, completion = [int(t) for t in prompt_ids], [int(t) for t in completion_ids]
            if not prompt:
                raise ValueError(f"item {index}: the prompt is empty (it needs at least one token, e.g. BOS)")
            if any(not 0 <= t < self._vocab_size for t in prompt + completion):
                raise ValueError(f"item {index}: token ids outside the vocabulary [0, {self._vocab_size})")
            if len(completion) + 1 > self.max_context:
                raise PromptTooLong(
                    f"item {index}: the completion has {len(completion)} tokens; with at least one prompt token "
                    f"it does not fit the model's context of {self.max_context} tokens"
                )
            cut = max(0, len(prompt) + len(completion) - self.max_context)
            prepared.append((prompt[cut:], completion))
            dropped.append(cut)
        return prepared, dropped

    def _score_chunks(self, items: list[tuple[list[int], list[int]]], todo: list[int]) -> list[list[int]]:
        """Group item indices into forwards: similar lengths together, within the batch, token and logit limits."""
        chunks: list[list[int]] = []
        chunk: list[int] = []
        longest = scored = 0
        for index in sorted(todo, key=lambda i: (len(items[i][0]) + len(items[i][1]), i)):
            prompt, completion = items[index]
            length, kept = max(longest, len(prompt) + len(completion)), max(scored, len(completion) + 1)
            rows = len(chunk) + 1
            if chunk and (
                rows > self.max_batch_size
                or rows * length > self.max_prefill_tokens
                or rows * kept * self._vocab_size > SCORE_LOGITS_BUDGET
            ):
                chunks.append(chunk)
                chunk, length, kept = [], len(prompt) + len(completion), len(completion) + 1
            chunk.append(index)
            longest, scored = length, kept
        if chunk:
            chunks.append(chunk)
        return chunks

    def _score_step(self) -> None:
        """Run the next chunk of the oldest score job (loop thread); resolve the job when it is done or fails."""
        while self._scoring and self._scoring[0].future.done():  # cancelled after a timeout
            self._scoring.popleft()
        if not self._scoring:
            return
        job = self._scoring[0]
        if not job.started:
            try:
                if not self._resolve_score_adapter(job):
                    return  # every adapter slot is busy: try again next iteration
            except Exception as exc:  # the adapter's own problem (AdapterMismatch, ...): raised as it is
                self._scoring.popleft()
                _set_exception(job.future, exc)
                return
            job.started = True
        try:
            self._score_chunk(job, job.chunks.popleft())
        except Exception as exc:
            self._scoring.popleft()
            log.error("scoring failed: %r", exc, exc_info=exc)
            error = GenerationError(f"scoring failed: {exc!r}")
            error.__cause__ = exc
            _set_exception(job.future, error)
            return
        if not job.chunks:
            self._scoring.popleft()
            _set_result(job.future, job.sums)

    def _resolve_score_adapter(self, job: _ScoreJob) -> bool:
        """Load or touch the job's adapter; False when it must wait for a free slot."""
        if job.adapter == BASE_ADAPTER:
            return True
        try:
            if job.adapter_path is not None:
                self._adapters.ensure(job.adapter, job.adapter_path, in_use=self._adapters_in_use())
            elif job.adapter in self._adapters:
                self._adapters.touch(job.adapter)
            else:
                raise AdapterNotLoaded(f"adapter {job.adapter!r} was unloaded before scoring started")
        except AdapterCapacityFull:
            return False
        return True

    def _score_chunk(self, job: _ScoreJob, indices: list[int]) -> None:
        """One teacher-forced forward over `indices` of the job (left-padded, no cache); adds up their NLL."""
        rows = [job.items[i] for i in indices]
        length = max(len(p) + len(c) for p, c in rows)
        kept = max(len(c) for _, c in rows) + 1  # logits of the last `kept` positions cover every completion
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        targets = torch.full((len(rows), kept - 1), _IGNORE, dtype=torch.long)
        for row, (prompt, completion) in enumerate(rows):
            ids[row, length - len(prompt) - len(completion) :] = torch.tensor(prompt + completion)
            mask[row, length - len(prompt) - len(completion) :] = 1
            # Rows are right-aligned: the logits at column j of the kept window predict the token after it.
            targets[row, kept - 1 - len(completion) :] = torch.tensor(completion)
        ids, mask, targets = ids.to(self.device), mask.to(self.device), targets.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": False,
        }
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = kept
        logits = self._adapters.forward([job.adapter] * len(rows), **kwargs).logits[:, -kept:-1, :]
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=_IGNORE, reduction="none"
        ).view(len(rows), kept - 1)
        for index, total in zip(indices, nll.double().sum(dim=-1).tolist(), strict=True):
            job.sums[index] = total
        self._stats.record_score(len(rows), sum(len(c) for _, c in rows))

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
        scoring = {job.adapter for job in self._scoring if job.started}
        return ({s.adapter for s in self._running} | scoring) - {BASE_ADAPTER}

    def _detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens. Runs twice per generated token (streaming): keep it lean."""
        with self._tokenizer_lock:
            if self._backend_decode is not None:
                return self._backend_decode(list(ids), skip_special_tokens=True)
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _probe(self) -> None:
        """Fail at start-up, not on the first request, if the model's cache cannot be batched this way."""
        ids = torch.tensor([[self._pad_id, self._pad_id], [self._pad_id, self._pad_id]], device=self.device)
        mask = torch.tensor([[0, 1], [1, 1]], device=self.device)
        cache = new_cache()
        self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, [BASE_ADAPTER, BASE_ADAPTER])
        check_supported(cache, 2)


def _run_into(operation: Callable[[], Any], future: Future[Any]) -> None:
    try:
        result = operation()
    except Exception as exc:
        _set_exception(future, exc)
    else:
        _set_result(future, result)


def _set_result(future: Future[T], result: T) -> None:
    # InvalidStateError: cancelled after a timeout, or already failed by close() racing the loop.
    with contextlib.suppress(InvalidStateError):
        future.set_result(result)


def _set_exception(future: Future[Any], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _context_length(model: PreTrainedModel, tokenizer: Any) -> int:
    text_config = model.config.get_text_config(decoder=True)
    length = getattr(text_config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    fallback = getattr(tokenizer, "model_max_length", None)
    if isinstance(fallback, int) and 0 < fallback < 10_000_000:
        return fallback
    raise ValueError("cannot tell the model's context length; pass max_context")


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _backend_decode(tokenizer: Any) -> Callable[..., str] | None:
    """The Rust `tokenizers.Tokenizer.decode` behind a fast tokenizer, when calling it directly is equivalent.

    `TokenizersBackend.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` only converts
    its input and calls the Rust decoder; skipping that wrapper (`to_py_obj`, kwargs handling) takes about two
    thirds off each call, which adds up to ~1 ms per decode step at batch 64. Tokenizer classes that override
    `decode`/`_decode` keep going through them.
    """
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the generic path is always correct
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is TokenizersBackend.decode
        and cls._decode is TokenizersBackend._decode
        and isinstance(backend, Tokenizer)
    ):
        return backend.decode  # type: ignore[no-any-return]
    return None


def _forward_parameters(model: PreTrainedModel) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
