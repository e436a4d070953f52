"""Continuous batching: the waiting queue, the running batch, and how requests move in and out of it.

Each engine iteration (`Scheduler.step`):

1. drops cancelled rows;
2. admits the requests taken from the waiting queue (`take_waiting`: while the batch has room, within
   `max_batch_size` and `max_prefill_tokens` of padded prompt per step), loads their adapters through the LRU
   in `adapters.py`, prefills them together (left-padded, explicit position ids) into a fresh cache, samples
   their first token, and merges that cache into the running one (`kv.PaddedKV`: the shorter side is
   left-padded along the sequence axis);
3. runs one decode step for every running row: the last sampled token of each row, its own position id,
   and the batch mask grown by one column (the compiled static path runs a few steps per call, feeding each
   step's tokens to the next on the device: `_chunk`);
4. streams the new text of each row (`text.py`), and removes finished rows right away (`index_select` on
   the cache, then the columns no remaining row uses are trimmed off the left).

So a new request joins at the next step instead of waiting for the batch to drain, and a finished one frees
its slot immediately. Rows of one forward may use different adapters: once an adapter is loaded the model is
a peft `PeftModelForCausalLM` and every forward passes `adapter_names=[...]` with one entry per row
("__base__" for the base model); peft computes the base layer once for the whole batch and adds each LoRA
delta to its own rows only, so a row gets what it would get alone (up to float rounding of batched kernels).

Errors: an exception in a prefill fails the requests being admitted; one in a decode step fails every
running request (the cache may be half-updated) and the batch carries on empty, as it does after a failure
between forwards (e.g. out of memory while merging caches).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.inference.adapters import AdapterCache
from workers.inference.handle import GenerationHandle
from workers.inference.request import BASE_ADAPTER, FinishReason, GenerationError, GenerationRequest, GenerationResult
from workers.inference.sampling import RowSampling, Sampled
from workers.inference.stats import EngineStats
from workers.inference.text import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)


class BatchKV(Protocol):
    """The running rows' KV state: `kv.PaddedKV` (dynamic path) or `static.slots.SlotBatch`."""

    @property
    def batch_size(self) -> int: ...

    def select(self, rows: list[int]) -> list[int]:
        """Keep `rows`; returns the kept rows in their new order."""
        ...

    def merge(self, other: Any) -> None: ...


class Decoder(Protocol):
    """What the scheduler runs forwards with: `runner.ModelRunner` or `static.decoder.StaticDecoder`."""

    adapters: AdapterCache

    def prefill(
        self, prompts: list[list[int]], adapters: list[str], sampling: list[RowSampling], after: Any = None
    ) -> tuple[Sampled, Any]: ...

    def decode(
        self,
        kv: Any,
        last_tokens: list[int],
        positions: list[int],
        adapters: list[str],
        sampling: list[RowSampling],
        history: list[list[int]] | None = None,
    ) -> Sampled: ...


@dataclass(eq=False)
class SequenceState:
    """A request's state inside the engine, from `submit` until its handle is resolved."""

    request: GenerationRequest
    handle: GenerationHandle
    prompt: list[int]
    max_new: int
    sampling: RowSampling
    decoder: IncrementalDecoder
    matcher: StopMatcher
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model
    done: bool = False  # finished or failed (its handle may be released only at the end of the iteration)

    @property
    def adapter(self) -> str:
        return self.request.adapter or BASE_ADAPTER


class Scheduler:
    """The waiting queue and the running batch of one engine. See the module docstring.

    `waiting` is guarded by `cond` (the engine's condition: callers append, the loop pops); everything else
    belongs to the loop thread.
    """

    def __init__(
        self,
        runner: Decoder,
        stats: EngineStats,
        cond: threading.Condition,
        *,
        eos: frozenset[int],
        max_batch_size: int,
        max_prefill_tokens: int,
    ) -> None:
        self._runner = runner
        self._adapters: AdapterCache = runner.adapters
        self._stats = stats
        self._cond = cond
        self._eos = eos
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # row order of `kv`
        self.kv: BatchKV | None = None
        self._finished: list[tuple[GenerationHandle, GenerationResult]] = []
        self._deferred = 0  # requests put back this iteration to wait for an adapter slot (front of `waiting`)

    def adapters_in_use(self) -> set[str]:
        """Adapters of the running rows (BASE_ADAPTER included when a row uses the base model)."""
        return {s.adapter for s in self.running}

    def take_waiting(self) -> list[SequenceState]:
        """Pop the requests to admit this iteration (called with `cond` held)."""
        taken: list[SequenceState] = []
        longest = 0
        while self.waiting and len(self.running) + len(taken) < self.max_batch_size:
            candidate = max(longest, len(self.waiting[0].prompt))
            if taken and candidate * (len(taken) + 1) > self.max_prefill_tokens:
                break
            taken.append(self.waiting.popleft())
            longest = candidate
        return taken

    def take_all(self) -> list[SequenceState]:
        """Every request still waiting or running, emptying the waiting queue (called with `cond` held)."""
        pending = list(self.waiting) + list(self.running)
        self.waiting.clear()
        return pending

    def step(self, admitted: list[SequenceState], busy: set[str]) -> tuple[list[str], list[SequenceState]]:
        """Admit `admitted` (whose adapters may not evict those in `busy`, e.g. a running score call's), then
        decode one token for every running row. Returns the request ids decoded and the requests prefilled."""
        ready: list[SequenceState] = []
        decoded: list[str] = []
        try:
            self._drop_cancelled()
            admitted = [s for s in admitted if not self._finish_if_cancelled(s)]
            ready = self._resolve_adapters(admitted, busy)
            if ready:
                self._prefill(ready)
            decoded = [s.request.request_id for s in self.running]
            if self.running:
                self._decode()
        except Exception as exc:
            # Outside the forward passes (e.g. out of memory while merging caches): the batch state cannot be
            # trusted any more, so fail what it holds and carry on with an empty batch.
            lost = [s for s in dict.fromkeys(self.running + ready) if not s.done]
            self.running, self.kv = [], None
            self.fail(lost, exc)
        finally:
            self._publish_finished()
        return decoded, ready

    def fail(self, sequences: list[SequenceState], exc: BaseException) -> None:
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

    # --- admission and forwards --------------------------------------------------------------------------

    def _resolve_adapters(self, admitted: list[SequenceState], busy: set[str]) -> list[SequenceState]:
        """Load the adapters `admitted` needs; requeue those that must wait for a free slot, fail bad ones."""
        ready: list[SequenceState] = []
        deferred: list[SequenceState] = []
        for sequence in admitted:
            request = sequence.request
            # Not `sequence.adapter`: an empty name must fail here as it always did, not fall back to the base.
            name = BASE_ADAPTER if request.adapter is None else request.adapter
            in_use = (busy | self.adapters_in_use() | {s.adapter for s in ready}) - {BASE_ADAPTER}
            try:
                acquired = self._adapters.acquire(name, request.adapter_path, in_use=in_use, user="the request")
            except Exception as exc:
                self.fail([sequence], exc)
                continue
            (ready if acquired else deferred).append(sequence)
        if deferred:
            with self._cond:
                self.waiting.extendleft(reversed(deferred))
        self._deferred = len(deferred)
        return ready

    def _prefill(self, sequences: list[SequenceState]) -> None:
        """Run the prompts of `sequences` together, sample their first tokens and merge them into the batch."""
        try:
            first, joined = self._runner.prefill(
                [s.prompt for s in sequences],
                [s.adapter for s in sequences],
                [s.sampling for s in sequences],
                after=self.kv,
            )
        except Exception as exc:
            self.fail(sequences, exc)
            return
        self._stats.record_prefill(len(sequences), len(sequences))
        keep = []
        for row, (sequence, token, logprob, top) in enumerate(
            zip(sequences, first.tokens, first.logprobs, first.tops, strict=True)
        ):
            sequence.position = len(sequence.prompt)
            if not self._accept(sequence, token, logprob, top):
                keep.append(row)
        if not keep:
            return
        order = joined.select(keep) if len(keep) < len(sequences) else keep
        if self.kv is None:
            self.kv = joined
        else:
            self.kv.merge(joined)
        self.running.extend(sequences[row] for row in order)

    def _decode(self) -> None:
        """One token for every running row, or a few (`_chunk`) where the decoder takes several per call."""
        rows = self.running
        assert self.kv is not None and self.kv.batch_size == len(rows)
        chunk = self._chunk(rows)
        try:
            inputs = (
                self.kv,
                [s.generated[-1] for s in rows],
                [s.position for s in rows],
                [s.adapter for s in rows],
                [s.sampling for s in rows],
            )
            if chunk > 1:
                steps = self._runner.decode_steps(*inputs, chunk)  # type: ignore[attr-defined]
            else:
                steps = [self._runner.decode(*inputs, [s.generated for s in rows])]
        except Exception as exc:
            # The cache may hold this step for some layers only: the whole batch is lost.
            self.running, self.kv = [], None
            self.fail(rows, exc)
            return
        keep, accepted = [], [0] * len(steps)
        for row, sequence in enumerate(rows):
            for step, sampled in enumerate(steps):
                if step and self._finish_if_cancelled(sequence):
                    break  # cancelled while this call ran: nothing more streams
                sequence.position += 1
                accepted[step] += 1
                if self._accept(sequence, sampled.tokens[row], sampled.logprobs[row], sampled.tops[row]):
                    break  # finished: the tokens of later steps are dropped
            else:
                keep.append(row)
        for tokens in accepted:
            if tokens:  # a step past the end of every row's output decoded nothing
                self._stats.record_decode(len(rows), tokens)
        if len(keep) < len(rows):
            self._retain(keep)

    def _chunk(self, rows: list[SequenceState]) -> int:
        """Tokens to decode in this call: the decoder's `chunk`, but one while requests wait to be admitted (a
        chunk would delay their first token) or a row follows a grammar (the host masks every token), and no
        more than any row still wants."""
        chunk: int = getattr(self._runner, "chunk", 1)
        # Requests that arrived since this iteration took the queue (not those waiting for an adapter slot,
        # which may wait for whole generations).
        admitting = len(self.waiting) > self._deferred and len(rows) < self.max_batch_size
        if chunk == 1 or admitting or any(s.sampling.constraint is not None for s in rows):
            return 1
        return max(1, min(chunk, max(s.max_new - len(s.generated) for s in rows)))

    # --- finishing ---------------------------------------------------------------------------------------

    def _accept(self, sequence: SequenceState, token: int, logprob: float, top: list[tuple[int, float]]) -> bool:
        """Record a sampled token and stream its text; True when the sequence finished (and was resolved)."""
        try:
            sequence.generated.append(token)
            sequence.logprobs.append(logprob)
            if sequence.sampling.top:
                sequence.tops.append(tuple(top))
            if constraint := sequence.sampling.constraint:
                constraint.consume(token)
            if token in self._eos and not sequence.request.ignore_eos:
                return self._finish(sequence, "stop")
            sequence.handle.push(sequence.matcher.feed(sequence.decoder.push(token)))
            if sequence.matcher.stopped or (constraint and constraint.finished):
                return self._finish(sequence, "stop")
            if len(sequence.generated) >= sequence.max_new:
                return self._finish(sequence, "length")
            return False
        except Exception as exc:  # e.g. the tokenizer failing on this sequence: it alone fails
            self.fail([sequence], exc)
            return True

    def _finish(self, sequence: SequenceState, reason: FinishReason) -> bool:
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
            token_logprobs=tuple(sequence.logprobs),
            top_logprobs=tuple(sequence.tops),
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

    def _finish_if_cancelled(self, sequence: SequenceState) -> bool:
        return sequence.handle.cancelled and self._finish(sequence, "cancelled")

    def _drop_cancelled(self) -> None:
        keep = [row for row, s in enumerate(self.running) if not self._finish_if_cancelled(s)]
        if len(keep) < len(self.running):
            self._retain(keep)

    def _retain(self, rows: list[int]) -> None:
        """Keep only `rows` of the running batch (finished ones leave right away)."""
        if not rows:
            self.running, self.kv = [], None
            return
        assert self.kv is not None
        order = self.kv.select(rows)  # the batch may reorder its rows (static slots move the last into gaps)
        self.running = [self.running[row] for row in order]
