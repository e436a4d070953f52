from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import create_database, drop_database
from tests.e2e.stack import E2E_DB, E2E_REDIS, Stack, running_stack

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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis.Redis.from_url(E2E_REDIS).flushdb()
    url = create_database(E2E_DB)
    data = tmp_path_factory.mktemp("pg-stack")
    env = {"STUDIO_DATA_DIR": str(data), "STUDIO_DATABASE__URL": url, "STUDIO_BROKER__URL": E2E_REDIS,
           "STUDIO_EVENTS__REDIS_URL": E2E_REDIS, "STUDIO_TRAINING__STALE_AFTER_S": "8",
           "STUDIO_INFERENCE__HEARTBEAT_INTERVAL_S": "0.5", "STUDIO_INFERENCE__WORKER_STALE_AFTER_S": "4",
           "STUDIO_INFERENCE__QUEUE_TIMEOUT_S": "15", "STUDIO_INFERENCE__MAX_BATCH_SIZE": "32"}  # fmt: skip
    try:
        with running_stack(env, data / "logs") as s:
            yield s
    finally:
        drop_database(E2E_DB)
