"""Tokenize training rows into `input_ids` and `labels`: what the loss sees, decided here and nowhere else.

- conversations (`messages`): every trained assistant turn with its end-of-turn marker (located by
  rendering, for any chat template: `app/core/chat_spans.py`); system and user turns are context only;
- prompt/completion: the completion and EOS;
- text: everything, and EOS.
`train_on_prompt` trains every token instead (the explicit opt-in). Labels are -100 where the loss is
off; trl's collator pads labels with -100 itself, so an EOS label survives even when pad == EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.core.chat_spans import assistant_spans, end_spans_before_markers, trained_token_mask

IGNORE = -100


def tokenize_row(row: Mapping[str, Any], data_format: str, tokenizer: Any, *, train_on_prompt: bool) -> dict[str, Any]:
    if data_format == "messages":
        return _conversation(row["messages"], tokenizer, train_on_prompt=train_on_prompt)
    if data_format == "prompt_completion":
        prompt = list(tokenizer(str(row["prompt"]))["input_ids"])
        completion = [*tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"], *_eos(tokenizer)]
        labels = prompt if train_on_prompt else [IGNORE] * len(prompt)
        return {"input_ids": prompt + completion, "labels": labels + completion}
    ids = [*tokenizer(str(row["text"]))["input_ids"], *_eos(tokenizer)]
    return {"input_ids": ids, "labels": list(ids)}


def _conversation(messages: list[dict[str, Any]], tokenizer: Any, *, train_on_prompt: bool) -> dict[str, Any]:
    def render(turns: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt))

    text, spans = assistant_spans(messages, render)
    # The template places its own special tokens (BOS, turn markers); the tokenizer must not add more.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = encoded["offset_mapping"]
    special_ids = set(tokenizer.all_special_ids)
    spans = end_spans_before_markers(spans, offsets, [token in special_ids for token in ids])
    trained = trained_token_mask(offsets, spans)
    labels = [t if train_on_prompt or keep else IGNORE for t, keep in zip(ids, trained, strict=True)]
    return {"input_ids": ids, "labels": labels}


def _eos(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else []


def trained_share(labels: Sequence[Sequence[int]]) -> dict[str, Any]:
    """How much of the data the loss sees: reported in the "started" event."""
    total = sum(len(row) for row in labels)
    trained = sum(1 for row in labels for label in row if label != IGNORE)
    return {"tokens": total, "trained_tokens": trained, "trained_share": round(trained / total, 4) if total else 0.0}
