"""Database engine and sessions. SQLite for the embedded default, Postgres (psycopg 3) in production."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, QueuePool
from sqlmodel import Session, create_engine

from app.core.config import DatabaseSettings, get_settings


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs (SQLAlchemy would pick psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, echo: bool = False, pool: DatabaseSettings | None = None) -> Engine:
    """An engine for ``url``; on Postgres its pool is sized and bounded by ``pool`` (defaults when None)."""
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Several processes (API, workers) share the file: wait for locks instead of failing.
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        pool = pool or DatabaseSettings()
        kwargs.update(
            pool_pre_ping=True,  # a connection cut while idle (database restart) is replaced, not handed out
            pool_size=pool.pool_size,
            max_overflow=pool.max_overflow,
            pool_timeout=pool.pool_timeout_s,  # exhausted: fail fast (503) instead of queueing threads
            pool_recycle=pool.pool_recycle_s,
            connect_args={"connect_timeout": pool.connect_timeout_s},
        )
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers (SSE streams) run while a worker writes metrics.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database.url, settings.database.echo, settings.database)


def pool_capacity(engine: Engine) -> int | None:
    """The most connections the engine's pool hands out at once; None when it has no bound."""
    pool = engine.pool
    if not isinstance(pool, QueuePool) or pool._max_overflow < 0:  # SQLAlchemy has no public accessor
        return None
    return pool.size() + pool._max_overflow


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for code outside a request (workers, relay, CLI)."""
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session


def is_postgres(session: Session) -> bool:
    """Row locks (FOR UPDATE, SKIP LOCKED) exist only there; SQLite serialises writers itself."""
    return session.get_bind().dialect.name == "postgresql"


def ping_database(timeout_s: int = 2) -> None:
    """``SELECT 1`` on a connection of its own (not the pool's: a probe must neither wait behind busy
    requests nor take their connection); raises when the database is unreachable or slow."""
    settings = get_settings().database
    url = normalize_url(settings.url)
    if url.startswith("sqlite"):
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return
    connect_args = {"connect_timeout": max(2, timeout_s), "options": f"-c statement_timeout={timeout_s * 1000}"}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
