"""Counters the engine loop updates and `InferenceEngine.stats()` reads from other threads."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any


class EngineStats:
    """Batch-size histogram, token counts and a recent-window throughput. Thread-safe."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._batch_sizes: Counter[int] = Counter()  # decode batch size -> number of decode steps
        self._prefills: Counter[int] = Counter()  # rows prefilled together -> number of prefill steps
        self._generated = 0
        self._finished = 0
        self._failed = 0
        self._scored_items = 0
        self._scored_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, within the window
        self._started = time.monotonic()

    def record_decode(self, batch_size: int, tokens: int) -> None:
        with self._lock:
            self._batch_sizes[batch_size] += 1
            self._add_tokens(tokens)

    def record_prefill(self, rows: int, tokens: int) -> None:
        with self._lock:
            self._prefills[rows] += 1
            self._add_tokens(tokens)

    def record_score(self, items: int, tokens: int) -> None:
        with self._lock:
            self._scored_items += items
            self._scored_tokens += tokens

    def record_finished(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._finished += 1
            else:
                self._failed += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            self._prune(now)
            span = min(self.window_s, now - self._started)
            recent = sum(tokens for _, tokens in self._recent)
            return {
                "batch_size_histogram": dict(sorted(self._batch_sizes.items())),
                "prefill_histogram": dict(sorted(self._prefills.items())),
                "decode_steps": sum(self._batch_sizes.values()),
                "generated_tokens": self._generated,
                "finished_requests": self._finished,
                "failed_requests": self._failed,
                "scored_items": self._scored_items,
                "scored_tokens": self._scored_tokens,
                "tokens_per_second": recent / span if span > 0 else 0.0,
                "window_s": self.window_s,
            }

    def _add_tokens(self, tokens: int) -> None:
        now = time.monotonic()
        self._generated += tokens
        self._recent.append((now, tokens))
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
