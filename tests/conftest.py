"""Test infrastructure: real Postgres and Redis, a fresh database per run, real processes for e2e.

Services come from STUDIO_TEST_PG (default postgresql://postgres@127.0.0.1:5432) and
STUDIO_TEST_REDIS (default redis://127.0.0.1:6379); `make test` starts them when they are down.
Settings are process-wide (cached), so the environment is set here, before the app is imported.
STUDIO_TEST_SERVICES=0 runs without them (only tests that need neither, e.g. `-m gpu` on a GPU box
that has no Postgres, Redis or API dependencies, or `-m fast`, whose `db` fixture is then a SQLite file).
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


# Redis dbs are a shared resource: a suite flushes its own at start, and its Celery workers take any
# task in theirs. So each run claims a free pair (in-process tests, then the e2e stack) with a key in
# db 0 that lives as long as a run may; two suites on one machine (a local run beside CI) stay apart.
REDIS_CLAIM_TTL_S = 3 * 3600
REDIS_PAIRS = range(2, 16, 2)


def _claim_redis_pair() -> int:
    import redis

    pinned = os.environ.get("STUDIO_TEST_REDIS_DB")
    if pinned is not None:
        return int(pinned)
    client = redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=3)
    for first in REDIS_PAIRS:
        if client.set(f"studio-test:redis-pair:{first}", RUN_ID, nx=True, ex=REDIS_CLAIM_TTL_S):
            return first
    pytest.exit(f"every Redis db pair at {REDIS_BASE} is claimed by another test run", returncode=2)


def _release_redis_pair(first: int) -> None:
    import redis

    client = redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=3)
    key = f"studio-test:redis-pair:{first}"
    if client.get(key) == RUN_ID.encode():
        client.delete(key)


# In-process tests (API through TestClient, services) share one database and the first Redis db of
# the pair; the e2e stack uses the second.
DB_NAME = f"studio_test_{RUN_ID}"
DATA_DIR = Path(tempfile.mkdtemp(prefix="studio-test-"))
os.environ.update({"STUDIO_DATA_DIR": str(DATA_DIR), "STUDIO_ENVIRONMENT": "development"})
if SERVICES:
    _check_services()
REDIS_DB = _claim_redis_pair() if SERVICES else 11
IN_PROCESS_REDIS = f"{REDIS_BASE}/{REDIS_DB}"
if SERVICES:
    os.environ.update(
        {
            "STUDIO_DATABASE__URL": create_database(DB_NAME),
            "STUDIO_BROKER__URL": IN_PROCESS_REDIS,
            "STUDIO_EVENTS__REDIS_URL": IN_PROCESS_REDIS,
        }
    )


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
    _release_redis_pair(REDIS_DB)


@pytest.fixture(scope="session")
def db() -> Iterator[None]:
    """A migrated database for in-process tests that make their own rows (``fast`` tests ask for it).

    With services it is the session's Postgres (migrated by ``_database``). Without them it is a SQLite
    file in the session's data dir, migrated once here, with no Redis for notifications: settings and
    the engine are cached, so both caches are cleared after the environment changes. App code is
    imported only here, so a bare GPU box (STUDIO_TEST_SERVICES=0, no sqlmodel) never loads it.
    """
    if SERVICES:
        yield
        return
    os.environ["STUDIO_DATABASE__URL"] = f"sqlite:///{DATA_DIR / 'fast.db'}"
    os.environ["STUDIO_EVENTS__REDIS_URL"] = ""
    os.environ.pop("STUDIO_BROKER__URL", None)
    from app.core import notify, replies, storage
    from app.core.config import get_settings
    from app.core.db import get_engine
    from app.core.migrate import upgrade

    for cached in (get_settings, get_engine, notify._client, replies.reply_channel, storage.get_storage):
        cached.cache_clear()
    upgrade()
    yield
    get_engine().dispose()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random Llama every training test uses (built once, offline, deterministic)."""
    from workers.training.tiny_model import build_tiny_model

    return build_tiny_model(DATA_DIR / "models" / "tiny", seed=0)


@pytest.hookimpl(trylast=True)  # after `-m` deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where CUDA exists (the device machine) and are skipped elsewhere."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:  # importing torch costs seconds; `make test-fast` selects no GPU test
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
