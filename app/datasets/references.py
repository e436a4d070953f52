"""Held-out rows as (prompt, reference answer) pairs: what evaluation asks the trained model and grades
its answers against. The split is the one training used (``split.py``, the run's eval fraction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.datasets.formats import to_training_record
from app.datasets.split import split_indices
from app.models.datasets import DatasetFormat


@dataclass(frozen=True)
class Reference:
    row: int  # 1-based row number in the dataset
    messages: list[dict[str, Any]] | None  # the conversation before the last answer (chat rows)
    prompt: str | None  # or the prompt (prompt/completion rows)
    answer: str

    @property
    def question(self) -> str:
        """The last user turn, or the prompt (what a judge is shown)."""
        if self.messages is not None:
            return next((str(m["content"]) for m in reversed(self.messages) if m["role"] == "user"), "")
        return self.prompt or ""


def held_out_references(
    rows: list[dict[str, Any]], fmt: DatasetFormat, eval_fraction: float, limit: int
) -> list[Reference]:
    """The first ``limit`` held-out rows that have a reference answer (chat rows ending in an assistant turn,
    prompt/completion rows); plain text and preference rows have none."""
    if fmt in (DatasetFormat.text, DatasetFormat.preference):
        return []
    _, held_out = split_indices(rows, eval_fraction)
    references = []
    for index in held_out:
        record = to_training_record(rows[index], fmt)
        if "messages" in record and record["messages"] and record["messages"][-1]["role"] == "assistant":
            history = [{"role": m["role"], "content": m["content"]} for m in record["messages"][:-1]]
            references.append(Reference(index + 1, history, None, str(record["messages"][-1]["content"])))
        elif "prompt" in record:
            references.append(Reference(index + 1, None, str(record["prompt"]), str(record["completion"])))
        if len(references) >= limit:
            break
    return references
