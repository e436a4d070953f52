from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "How many legs does a spider have?", "output": "A spider has eight legs."},
    {"instruction": "Greet the user", "input": "Bob", "output": "Hello Bob, nice to meet you."},
    {"instruction": "Why is the sky blue?", "output": "Sunlight scatters off the air."},
] * 4
CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": row["instruction"]},
                  {"role": "assistant", "content": row["output"]}]}
    for row in ALPACA_ROWS
]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
