from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from workers.training.token_stats import summarize, token_lengths


def test_lengths_follow_the_tokenizer_and_count_rows_that_will_be_cut(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"text": "the cat likes a short story"}, {"text": " ".join(["the cat likes a short story"] * 30)}]
    lengths = token_lengths(rows, "text", tokenizer)
    assert lengths == [len(tokenizer(r["text"])["input_ids"]) for r in rows]
    stats = summarize(lengths, max_seq_length=lengths[0] + 1)
    assert stats["rows_over_max_seq_length"] == 1 and stats["tokens_max"] == lengths[1]
    assert stats["tokens_total"] == sum(lengths)

    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    rendered = tokenizer.apply_chat_template(chat[0]["messages"], tokenize=False)
    assert token_lengths(chat, "messages", tokenizer) == [
        len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    ]
    pc = [{"prompt": "What is the capital of France?", "completion": " Paris."}]
    assert token_lengths(pc, "prompt_completion", tokenizer)[0] > 5
