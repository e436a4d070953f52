"""Token statistics of a training set with the run's own tokenizer: how long the rows are, and how many
``max_seq_length`` will cut. Reported in the "started" event, so a user sees truncation before it costs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BATCH = 1000


def row_texts(rows: Sequence[Mapping[str, Any]], data_format: str, tokenizer: Any) -> list[str]:
    """Each row as the text the model reads (chat rows through the tokenizer's chat template)."""
    if data_format == "messages":
        return [str(tokenizer.apply_chat_template(row["messages"], tokenize=False)) for row in rows]
    if data_format == "prompt_completion":
        return [str(row["prompt"]) + str(row["completion"]) for row in rows]
    return [str(row["text"]) for row in rows]


def token_lengths(rows: Sequence[Mapping[str, Any]], data_format: str, tokenizer: Any) -> list[int]:
    texts = row_texts(rows, data_format, tokenizer)
    # Chat templates already place their special tokens; plain text gets the tokenizer's own (BOS).
    special = data_format != "messages"
    lengths: list[int] = []
    for start in range(0, len(texts), BATCH):
        ids = tokenizer(texts[start : start + BATCH], add_special_tokens=special)["input_ids"]
        lengths += [len(x) for x in ids]
    return lengths


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
