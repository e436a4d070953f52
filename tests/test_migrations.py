"""Migrations build the schema the models describe, on Postgres and on SQLite."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import app.models  # noqa: F401
from app.core.db import make_engine
from app.core.migrate import upgrade
from tests.conftest import RUN_ID, create_database, drop_database


def _drift(url: str) -> list[object]:
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def test_no_drift_on_postgres() -> None:
    name = f"studio_test_drift_{RUN_ID}"  # this run's own, so two suites side by side don't share it
    url = create_database(name)
    try:
        assert _drift(url) == []
    finally:
        drop_database(name)


def test_no_drift_on_sqlite(tmp_path: Path) -> None:
    assert _drift(f"sqlite:///{tmp_path / 'drift.db'}") == []
