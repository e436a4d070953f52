"""Deterministic train/eval split: the same rows and fraction always give the same split."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def row_key(row: dict[str, Any], seed: int) -> str:
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(f"{seed}:{canonical}".encode()).hexdigest()


def eval_count(n_rows: int, eval_fraction: float) -> int:
    """At least one eval row when a fraction is asked for, and never every row."""
    if eval_fraction <= 0 or n_rows < 2:
        return 0
    return min(n_rows - 1, max(1, round(n_rows * eval_fraction)))


def split_sizes(n_rows: int, eval_fraction: float) -> tuple[int, int]:
    """(train, eval) row counts of ``split_indices`` over ``n_rows`` rows.

    They depend only on how many rows there are, so an upload's counts are known while its rows stream
    past, without keeping them; which rows are held out is decided where the rows are read back.
    """
    k = eval_count(n_rows, eval_fraction)
    return n_rows - k, k


def split_indices(rows: list[dict[str, Any]], eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Rank rows by a content hash and hold out the first ones: stable under reordering."""
    order = sorted(range(len(rows)), key=lambda i: (row_key(rows[i], seed), i))
    k = eval_count(len(rows), eval_fraction)
    held_out = set(order[:k])
    train = [i for i in range(len(rows)) if i not in held_out]
    return train, sorted(held_out)
