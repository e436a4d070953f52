"""What the loss sees (workers/training/masks.py, app/core/chat_spans.py): the answers only, with their
end-of-turn marker, for every data format and every common chat-template style; everything with
`train_on_prompt`; never silently everything when a template cannot be read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.core.chat_spans import SpansNotFound
from workers.training.masks import IGNORE, tokenize_row

SYSTEM, Q1, A1, Q2, A2 = (
    "You are a helpful assistant.",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "How many legs does a spider have?",
    "A spider has eight legs.",
)
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]

# Each style as its family writes it (simplified to what matters: turn markers and where a turn ends),
# with the text that must be trained after each answer.
TEMPLATES: dict[str, tuple[str, list[str], str]] = {
    "chatml_qwen": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ["<|im_start|>", "<|im_end|>"],
        "<|im_end|>\n",
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
    "mistral_inst": (
        "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
        "{{ '[INST] ' + messages[0]['content'] + '\\n\\n' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}",
        ["<s>", "</s>", "[INST]", "[/INST]"],
        "</s>",
    ),
    "gemma": (
        "{{ '<bos>' }}{% for m in messages %}{% if m['role'] != 'system' %}"
        "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>\n",
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}",
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        "<|end|>\n",
    ),
    "generation_markers": (  # the tiny model's own: trl-style {% generation %} markers
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ["<|im_start|>", "<|im_end|>"],
        "<|im_end|>\n",
    ),
}


def tokenizer_with(tiny_model: Path, template: str, special: list[str]) -> PreTrainedTokenizerBase:
    """The tiny tokenizer with another family's template, its markers as special tokens (as real ones are)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"additional_special_tokens": special})  # type: ignore[dict-item]
    tokenizer.chat_template = template
    return tokenizer


def trained_runs(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> list[str]:
    """The trained tokens as contiguous runs of decoded text."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        trained = label != IGNORE
        if trained and not previous:
            runs.append([])
        if trained:
            assert label == token
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_a_multi_turn_mask_is_exactly_the_answers_and_their_end_of_turn(tiny_model: Path, style: str) -> None:
    template, special, end = TEMPLATES[style]
    tokenizer = tokenizer_with(tiny_model, template, special)
    row = tokenize_row({"messages": CONVERSATION}, "messages", tokenizer, train_on_prompt=False)
    expected = [A1 + end, A2 + end]
    if style == "mistral_inst":
        expected = [" " + A1 + end, " " + A2 + end]  # the template writes the answer after a space
    if style == "phi3":
        expected[-1] += "<|endoftext|>"  # the template closes the conversation with EOS: the last answer learns it
    assert trained_runs(tokenizer, row) == expected
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_train_on_prompt_trains_every_token(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = tokenize_row({"messages": CONVERSATION}, "messages", tokenizer, train_on_prompt=True)
    assert row["labels"] == row["input_ids"]


def test_an_assistant_turn_with_weight_zero_is_not_trained(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0  # OpenAI's fine-tuning format
    row = tokenize_row({"messages": messages}, "messages", tokenizer, train_on_prompt=False)
    assert trained_runs(tokenizer, row) == [A2 + "<|im_end|>\n"]
    assert "weight" not in tokenizer.decode(row["input_ids"])  # the key never reaches the template


def test_prompt_completion_trains_the_completion_and_eos(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = tokenize_row({"prompt": Q1, "completion": " " + A1}, "prompt_completion", tokenizer, train_on_prompt=False)
    assert trained_runs(tokenizer, row) == [" " + A1 + tokenizer.eos_token]
    both = tokenize_row({"prompt": Q1, "completion": " " + A1}, "prompt_completion", tokenizer, train_on_prompt=True)
    assert both["labels"] == both["input_ids"] == row["input_ids"]


def test_text_trains_everything_and_ends_with_eos(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    row = tokenize_row({"text": A1}, "text", tokenizer, train_on_prompt=False)
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_a_template_that_rewrites_earlier_turns_is_refused_not_trained_whole(tiny_model: Path) -> None:
    # Like templates that drop past reasoning: an answer renders differently once a later turn follows.
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n(earlier answer)<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = tokenizer_with(tiny_model, rewriting, [])
    with pytest.raises(SpansNotFound, match="turn 3 .assistant. differently once later turns follow"):
        tokenize_row({"messages": CONVERSATION}, "messages", tokenizer, train_on_prompt=False)


def test_the_eos_label_survives_padding_when_pad_is_eos(tiny_model: Path) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token
    short = tokenize_row({"prompt": Q1, "completion": " Paris."}, "prompt_completion", tokenizer, train_on_prompt=False)
    long = tokenize_row({"prompt": Q2, "completion": " " + A2}, "prompt_completion", tokenizer, train_on_prompt=False)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([short, long])
    eos_at = len(short["input_ids"]) - 1
    assert batch["input_ids"][0, eos_at] == tokenizer.eos_token_id
    assert batch["labels"][0, eos_at] == tokenizer.eos_token_id  # trained: the model learns to stop
    assert (batch["labels"][0, eos_at + 1 :] == IGNORE).all()  # padding is not


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_the_api_shows_the_mask_the_trainer_builds(tiny_model: Path, tmp_path: Path, style: str) -> None:
    """The API renders templates without transformers (app/datasets/templates.py); its preview of what
    the loss sees must be the trainer's mask, token for token."""
    from app.datasets.templates import find_span_problem, mask_preview

    template, special, _ = TEMPLATES[style]
    tokenizer = tokenizer_with(tiny_model, template, special)
    tokenizer.save_pretrained(tmp_path)
    row = tokenize_row({"messages": CONVERSATION}, "messages", tokenizer, train_on_prompt=False)
    preview = mask_preview(tmp_path, CONVERSATION, train_on_prompt=False)
    assert preview is not None and preview["rendered"] == tokenizer.decode(row["input_ids"])
    assert [t["trained"] for t in preview["tokens"]] == [label != IGNORE for label in row["labels"]]
    assert find_span_problem(tmp_path, [CONVERSATION]) is None


def test_the_api_refuses_a_template_whose_answers_cannot_be_located(tiny_model: Path, tmp_path: Path) -> None:
    from app.datasets.templates import find_span_problem

    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '(earlier answer)' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    )
    tokenizer_with(tiny_model, rewriting, []).save_pretrained(tmp_path)
    problem = find_span_problem(tmp_path, [CONVERSATION])
    assert problem is not None and problem.startswith("row 1: the chat template renders turn 3")
