"""Alembic environment: the URL comes from studio settings; SQLite gets batch mode for ALTERs."""

from alembic import context
from sqlmodel import SQLModel

import app.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from app.core.db import make_engine
from app.core.config import get_settings

target_metadata = SQLModel.metadata


def run_migrations() -> None:
    url = context.config.attributes.get("url") or get_settings().database.url
    connectable = context.config.attributes.get("connection") or make_engine(url)
    if hasattr(connectable, "connect"):
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
