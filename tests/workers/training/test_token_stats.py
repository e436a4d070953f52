from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from workers.training.masks import tokenize_row, trained_share
from workers.training.token_stats import summarize


def test_lengths_count_rows_that_will_be_cut_and_the_share_the_loss_sees(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["the cat likes a short story", " ".join(["the cat likes a short story"] * 30)]
    rows = [tokenize_row({"text": t}, "text", tokenizer, train_on_prompt=False) for t in texts]
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths == [len(tokenizer(t)["input_ids"]) + 1 for t in texts]  # + EOS
    stats = summarize(lengths, max_seq_length=lengths[0] + 1)
    assert stats["rows_over_max_seq_length"] == 1 and stats["tokens_max"] == lengths[1]
    assert stats["tokens_total"] == sum(lengths)

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    row = tokenize_row(chat, "messages", tokenizer, train_on_prompt=False)
    share = trained_share([row["labels"]])
    assert share["tokens"] == len(row["input_ids"])
    assert 0 < share["trained_tokens"] < share["tokens"] and share["trained_share"] < 1
    assert trained_share([r["labels"] for r in rows])["trained_share"] == 1.0
