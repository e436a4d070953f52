"""Test infrastructure: real Postgres and Redis, a fresh database per run, real processes for e2e.

Services come from STUDIO_TEST_PG (default postgresql://postgres@127.0.0.1:5432) and
STUDIO_TEST_REDIS (default redis://127.0.0.1:6379); `make test` starts them when they are down.
Settings are process-wide (cached), so the environment is set here, before the app is imported.
STUDIO_TEST_SERVICES=0 runs without them (only tests that need neither, e.g. `-m gpu` on a GPU box
that has no Postgres, Redis or API dependencies).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN = os.environ.get("STUDIO_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("STUDIO_TEST_REDIS", "redis://127.0.0.1:6379")
RUN_ID = secrets.token_hex(4)
SERVICES = os.environ.get("STUDIO_TEST_SERVICES", "1") != "0"


def create_database(name: str) -> str:
    import psycopg

    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN}/{name}"


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _check_services() -> None:
    import psycopg
    import redis

    try:
        psycopg.connect(f"{PG_ADMIN}/postgres", connect_timeout=3).close()
    except psycopg.Error as exc:
        pytest.exit(f"Postgres is not reachable at {PG_ADMIN}: {exc}".splitlines()[0], returncode=2)
    try:
        redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.exit(f"Redis is not reachable at {REDIS_BASE}: {exc}", returncode=2)


# In-process tests (API through TestClient, services) share one database and Redis db 11.
DB_NAME = f"studio_test_{RUN_ID}"
DATA_DIR = Path(tempfile.mkdtemp(prefix="studio-test-"))
IN_PROCESS_REDIS = f"{REDIS_BASE}/11"
os.environ.update({"STUDIO_DATA_DIR": str(DATA_DIR), "STUDIO_ENVIRONMENT": "development"})
if SERVICES:
    _check_services()
    os.environ.update({
        "STUDIO_DATABASE__URL": create_database(DB_NAME),
        "STUDIO_BROKER__URL": IN_PROCESS_REDIS,
        "STUDIO_EVENTS__REDIS_URL": IN_PROCESS_REDIS,
    })  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _database() -> Iterator[None]:
    if not SERVICES:
        yield
        return
    import redis

    from app.core.migrate import upgrade

    redis.Redis.from_url(IN_PROCESS_REDIS).flushdb()
    upgrade()
    yield
    from app.core.db import get_engine

    get_engine().dispose()
    drop_database(DB_NAME)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random Llama every training test uses (built once, offline, deterministic)."""
    from workers.training.tiny_model import build_tiny_model

    return build_tiny_model(DATA_DIR / "models" / "tiny", seed=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where CUDA exists (the device machine) and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
