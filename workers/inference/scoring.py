"""Teacher-forced scoring (`InferenceEngine.score`): the NLL of completions, for evaluations and A/B tests.

A score call shares the engine's loop with generation: it is split into chunks (similar lengths together,
left-padded, no KV cache) and the loop runs one chunk per iteration, between the control operations and the
prefill/decode step. So the model is never used from two threads, generation keeps streaming while a long
evaluation runs, and the running batch's cache is never touched. While a score call runs, its adapter counts
as in use (the LRU will not evict it).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from workers.inference.request import BASE_ADAPTER, GenerationError, PromptTooLong
from workers.inference.runner import ModelRunner
from workers.inference.stats import EngineStats

log = logging.getLogger(__name__)

T = TypeVar("T")

# At most this many logit elements (rows x scored positions x vocab) per scoring chunk: the float32 logits and
# their log-softmax are the biggest tensors of a scoring forward (2**27 elements: 512 MiB each in float32).
SCORE_LOGITS_BUDGET = 1 << 27
_IGNORE = -100  # cross_entropy's ignore_index

Item = tuple[list[int], list[int]]  # (prompt, completion)


@dataclass(eq=False)
class ScoreJob:
    """One `score()` call inside the engine: its items, the chunks still to run, and the caller's future."""

    items: list[Item]  # prompts already cut to fit the context
    chunks: deque[list[int]]  # indices into `items`, one list per forward
    adapter: str  # BASE_ADAPTER for the base model
    adapter_path: Path | None
    future: Future[list[float]]  # the NLL sum of each item
    sums: list[float]
    started: bool = False  # its adapter is resolved and counts as in use until the job ends


def prepare_items(
    items: Iterable[tuple[Sequence[int], Sequence[int]]], *, vocab_size: int, max_context: int
) -> tuple[list[Item], list[int]]:
    """Validate and copy the items (caller thread); cut long prompts from the left. Returns items, cuts."""
    prepared: list[Item] = []
    dropped: list[int] = []
    for index, item in enumerate(items):
        prompt_ids, completion_ids = item
        prompt, completion = [int(t) for t in prompt_ids], [int(t) for t in completion_ids]
        if not prompt:
            raise ValueError(f"item {index}: the prompt is empty (it needs at least one token, e.g. BOS)")
        if any(not 0 <= t < vocab_size for t in prompt + completion):
            raise ValueError(f"item {index}: token ids outside the vocabulary [0, {vocab_size})")
        if len(completion) + 1 > max_context:
            raise PromptTooLong(
                f"item {index}: the completion has {len(completion)} tokens; with at least one prompt token "
                f"it does not fit the model's context of {max_context} tokens"
            )
        cut = max(0, len(prompt) + len(completion) - max_context)
        prepared.append((prompt[cut:], completion))
        dropped.append(cut)
    return prepared, dropped


def plan_chunks(
    items: list[Item], todo: list[int], *, max_batch_size: int, max_prefill_tokens: int, vocab_size: int
) -> list[list[int]]:
    """Group item indices into forwards: similar lengths together, within the batch, token and logit limits."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    longest = scored = 0
    for index in sorted(todo, key=lambda i: (len(items[i][0]) + len(items[i][1]), i)):
        prompt, completion = items[index]
        length, kept = max(longest, len(prompt) + len(completion)), max(scored, len(completion) + 1)
        rows = len(chunk) + 1
        if chunk and (
            rows > max_batch_size
            or rows * length > max_prefill_tokens
            or rows * kept * vocab_size > SCORE_LOGITS_BUDGET
        ):
            chunks.append(chunk)
            chunk, length, kept = [], len(prompt) + len(completion), len(completion) + 1
        chunk.append(index)
        longest, scored = length, kept
    if chunk:
        chunks.append(chunk)
    return chunks


class Scorer:
    """The score calls of one engine. `queue` is guarded by the engine's condition (callers append); the loop
    moves it into `jobs` (`take_queued`) and runs them oldest first, one chunk per `step`."""

    def __init__(self, runner: ModelRunner, stats: EngineStats) -> None:
        self._runner = runner
        self._stats = stats
        self.queue: deque[ScoreJob] = deque()
        self.jobs: deque[ScoreJob] = deque()  # loop thread only: jobs taken from `queue`, FIFO

    def take_queued(self) -> None:
        """Called with the engine's condition held."""
        self.jobs.extend(self.queue)
        self.queue.clear()

    def take_all(self) -> list[ScoreJob]:
        """Every job not resolved yet, emptying the queue (called with the engine's condition held)."""
        jobs = list(self.queue) + list(self.jobs)
        self.queue.clear()
        return jobs

    def adapters_in_use(self) -> set[str]:
        return {job.adapter for job in self.jobs if job.started}

    def step(self, busy: set[str]) -> None:
        """Run the next chunk of the oldest job (loop thread); resolve the job when it is done or fails.

        `busy`: adapters that loading this job's adapter must not evict (the running generation rows')."""
        while self.jobs and self.jobs[0].future.done():  # cancelled after a timeout
            self.jobs.popleft()
        if not self.jobs:
            return
        job = self.jobs[0]
        if not job.started:
            try:
                in_use = (busy | self.adapters_in_use()) - {BASE_ADAPTER}
                if not self._runner.adapters.acquire(job.adapter, job.adapter_path, in_use=in_use, user="scoring"):
                    return  # every adapter slot is busy: try again next iteration
            except Exception as exc:  # the adapter's own problem (AdapterMismatch, ...): raised as it is
                self.jobs.popleft()
                set_exception(job.future, exc)
                return
            job.started = True
        try:
            self._score_chunk(job, job.chunks.popleft())
        except Exception as exc:
            self.jobs.popleft()
            log.error("scoring failed: %r", exc, exc_info=exc)
            error = GenerationError(f"scoring failed: {exc!r}")
            error.__cause__ = exc
            set_exception(job.future, error)
            return
        if not job.chunks:
            self.jobs.popleft()
            set_result(job.future, job.sums)

    def _score_chunk(self, job: ScoreJob, indices: list[int]) -> None:
        """One teacher-forced forward over `indices` of the job (left-padded, no cache); adds up their NLL."""
        rows = [job.items[i] for i in indices]
        kept = max(len(c) for _, c in rows) + 1  # logits of the last `kept` positions cover every completion
        targets = torch.full((len(rows), kept - 1), _IGNORE, dtype=torch.long)
        for row, (_, completion) in enumerate(rows):
            # Rows are right-aligned: the logits at column j of the kept window predict the token after it.
            targets[row, kept - 1 - len(completion) :] = torch.tensor(completion)
        ids, mask, positions = self._runner.left_pad([prompt + completion for prompt, completion in rows])
        targets = targets.to(self._runner.device)
        logits = self._runner.logits(ids, mask, positions, [job.adapter] * len(rows), keep=kept)[:, :-1, :]
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=_IGNORE, reduction="none"
        ).view(len(rows), kept - 1)
        for index, total in zip(indices, nll.double().sum(dim=-1).tolist(), strict=True):
            job.sums[index] = total
        self._stats.record_score(len(rows), sum(len(c) for _, c in rows))


def set_result(future: Future[T], result: T) -> None:
    # InvalidStateError: cancelled after a timeout, or already failed by close() racing the loop.
    with contextlib.suppress(InvalidStateError):
        future.set_result(result)


def set_exception(future: Future[Any], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)
