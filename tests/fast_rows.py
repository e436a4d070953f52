"""Rows for the fast tests of the job system: a team, a dataset and an experiment, written straight to the
database the ``db`` fixture provides (SQLite in ``make test-fast``, the session's Postgres otherwise).

Every experiment gets a queue name of its own, so a test can pick out its outbox rows from those of other
tests sharing the database.
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import timedelta
from typing import Any

from sqlmodel import col, select

from app.core.db import session_scope
from app.core.layout import dataset_prefix, dataset_rows_key
from app.core.storage import Storage
from app.models import Dataset, DatasetFormat, Experiment, ExperimentEvent, ExperimentStatus, OutboxMessage, utcnow
from tests.accounts import make_team

TEXT_ROWS = [{"text": f"row {i}: the quick brown fox"} for i in range(4)]


def make_dataset(team_id: uuid.UUID | None = None, storage: Storage | None = None) -> Dataset:
    """A text dataset; with ``storage``, its rows are stored where ``prepare_run`` reads them."""
    dataset = Dataset(
        team_id=team_id or make_team(),
        name=f"ds-{secrets.token_hex(3)}",
        format=DatasetFormat.text,
        row_count=len(TEXT_ROWS),
        train_rows=len(TEXT_ROWS),
        eval_rows=0,
        eval_fraction=0.0,
        content_hash=secrets.token_hex(32),
        size_bytes=100,
        storage_prefix="",
    )
    dataset.storage_prefix = dataset_prefix(dataset.id)
    if storage is not None:
        storage.put_bytes(dataset_rows_key(dataset.id), "".join(json.dumps(r) + "\n" for r in TEXT_ROWS).encode())
    with session_scope() as session:
        session.add(dataset)
        session.commit()
    return dataset


def make_experiment(
    *,
    status: ExperimentStatus = ExperimentStatus.queued,
    attempt: int = 0,
    heartbeat_age_s: float | None = None,
    stop_requested: bool = False,
    dataset: Dataset | None = None,
) -> Experiment:
    """An experiment row as the API leaves it (queued @ attempt 0), or in the state a test needs."""
    dataset = dataset or make_dataset()
    experiment = Experiment(
        team_id=dataset.team_id,
        name=f"exp-{secrets.token_hex(3)}",
        base_model="tiny",
        dataset_id=dataset.id,
        queue=f"train.test-{secrets.token_hex(4)}",
        status=status,
        attempt=attempt,
        stop_requested=stop_requested,
        heartbeat_at=None if heartbeat_age_s is None else utcnow() - timedelta(seconds=heartbeat_age_s),
    )
    with session_scope() as session:
        session.add(experiment)
        session.commit()
    return experiment


def reload(experiment_id: uuid.UUID) -> Experiment:
    with session_scope() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        return experiment


def set_columns(experiment_id: uuid.UUID, **values: Any) -> None:
    """Change the row as another process (the API, the reaper) would."""
    with session_scope() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        for name, value in values.items():
            setattr(experiment, name, value)
        session.add(experiment)
        session.commit()


def events(experiment_id: uuid.UUID, type_: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The experiment's event log as (type, data), in seq order."""
    with session_scope() as session:
        query = select(ExperimentEvent).where(ExperimentEvent.experiment_id == experiment_id)
        rows = session.exec(query.order_by(col(ExperimentEvent.seq))).all()
        return [(e.type, e.data) for e in rows if type_ is None or e.type == type_]


def statuses(experiment_id: uuid.UUID) -> list[str]:
    return [data["status"] for _, data in events(experiment_id, "status")]


def outbox_rows(queue: str) -> list[OutboxMessage]:
    with session_scope() as session:
        query = select(OutboxMessage).where(OutboxMessage.queue == queue).order_by(col(OutboxMessage.id))
        return list(session.exec(query).all())
