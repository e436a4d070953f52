"""Token statistics of a tokenized training set: how long the rows are, and how many ``max_seq_length``
will cut. Reported in the "started" event, so a user sees truncation before it costs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def summarize(lengths: Sequence[int], max_seq_length: int) -> dict[str, Any]:
    ordered = sorted(lengths)
    n = len(ordered)
    return {
        "tokens_total": sum(ordered),
        "tokens_mean": round(sum(ordered) / n, 1) if n else 0.0,
        "tokens_p50": ordered[n // 2] if n else 0,
        "tokens_p95": ordered[min(n - 1, int(n * 0.95))] if n else 0,
        "tokens_max": ordered[-1] if n else 0,
        "rows_over_max_seq_length": sum(1 for x in ordered if x > max_seq_length),
        "max_seq_length": max_seq_length,
    }
