"""Where the assistant's answers are in a rendered conversation, for any chat template.

The loss of a fine-tune on chat data sees the assistant turns only (with their end-of-turn marker, so
the model learns to stop). Templates differ (ChatML, Llama 3, Mistral `[INST]`, Gemma, Phi, ...) and
most have no `{% generation %}` markers, so the spans are found by rendering: the answer of turn *i*
is what `render(messages[:i+1])` adds after `render(messages[:i], add_generation_prompt=True)`. That
holds for every template that renders a conversation as a growing prefix; one that re-renders earlier
turns once later ones follow (e.g. strips past reasoning) cannot be located, and says so instead of
silently training on everything.

Pure Python on strings: the trainer child turns the character spans into token labels with the
tokenizer's offsets; the API can check a template the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]
# (messages, add_generation_prompt) -> the rendered text
Render = Callable[[list[dict[str, Any]], bool], str]


# Used only when a conversational dataset meets a tokenizer without a chat template (most base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class SpansNotFound(ValueError):
    """The chat template does not render the conversation as a growing prefix."""


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages as a template sees them: OpenAI's training-only `weight` key removed."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def is_trained(message: Message) -> bool:
    """An assistant turn is trained unless it carries OpenAI's `weight: 0`."""
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def assistant_spans(messages: Sequence[Message], render: Render) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation, and the [start, end) character span of each trained assistant turn
    (its content and whatever the template closes the turn with)."""
    clean = template_messages(messages)
    text = _render(render, clean, False, "the conversation")
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(render, clean[:i], True, f"the prompt of turn {i + 1}")
        through = _render(render, clean[: i + 1], False, f"the conversation up to turn {i + 1}")
        end = _turn_end(text, before, through)
        if end is None:
            raise SpansNotFound(
                f"the chat template renders turn {i + 1} (assistant) differently once later turns follow, so its "
                "answer cannot be located; use a template that renders conversations as a growing prefix, or "
                "train_on_prompt"
            )
        if is_trained(message):
            spans.append((len(before), end))
    return text, spans


def _turn_end(text: str, before: str, through: str) -> int | None:
    """Where the turn that ``through`` adds after ``before`` ends in ``text``, or None if it is not there.
    Some templates close the whole conversation (an EOS after the last turn): that closing text ends
    ``through`` but not the turn inside ``text``, so it is left to the last turn."""
    if not through.startswith(before) or len(through) == len(before):
        return None
    if text.startswith(through):
        return len(through)
    common = len(os.path.commonprefix([through, text]))
    closing = through[common:]
    if common > len(before) and text.endswith(closing):
        return common
    return None


def trained_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token (its character offsets in the rendered text), whether it overlaps a trained span."""
    mask = []
    span_index = 0
    for start, end in offsets:
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        inside = span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]
        mask.append(inside)
    return mask


def end_spans_before_markers(
    spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]], special: Sequence[bool]
) -> list[tuple[int, int]]:
    """Spans are found on characters; a turn that ends where the next marker begins can share its first
    characters with the conversation's closing marker (`<|` of `<|user|>` and `<|endoftext|>`). A span end
    inside a special token belongs before it: markers are atomic."""
    fixed = []
    for start, end in spans:
        for (token_start, token_end), is_special in zip(offsets, special, strict=True):
            if is_special and token_start < end < token_end:
                end = token_start
                break
        fixed.append((start, end))
    return fixed


def _render(render: Render, messages: list[dict[str, Any]], generation_prompt: bool, what: str) -> str:
    try:
        return render(messages, generation_prompt)
    except Exception as exc:  # templates raise on shapes they refuse (e.g. a conversation without a user turn)
        raise SpansNotFound(f"the chat template cannot render {what}: {exc}") from exc
