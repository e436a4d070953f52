"""SQLModel tables and API schemas.

Families follow the FastAPI template: ``XBase`` (shared fields), ``X`` (table), ``XCreate`` (request
body), ``XPublic`` / ``XsPublic`` (responses). Every user-owned row carries ``team_id``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

# Until accounts land (issue 3), everything belongs to this team, created by the first migration.
DEFAULT_TEAM_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Team(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=100, unique=True)
    created_at: datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------- datasets


class DatasetFormat(StrEnum):
    text = "text"
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"
    preference = "preference"


class DatasetBase(SQLModel):
    name: str = Field(min_length=1, max_length=200)


class Dataset(DatasetBase, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    format: DatasetFormat
    row_count: int
    train_rows: int
    eval_rows: int
    eval_fraction: float
    content_hash: str = Field(max_length=64, index=True)
    size_bytes: int = Field(sa_type=BigInteger)
    storage_prefix: str = Field(max_length=300)
    preview: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class DatasetCreate(DatasetBase):
    rows: list[dict[str, Any]] = Field(description="Rows in one of the supported formats")
    format: DatasetFormat | None = Field(None, description="Detected when omitted")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class DatasetPublic(DatasetBase):
    id: uuid.UUID
    team_id: uuid.UUID
    format: DatasetFormat
    row_count: int
    train_rows: int
    eval_rows: int
    eval_fraction: float
    content_hash: str
    size_bytes: int
    created_at: datetime


class DatasetsPublic(SQLModel):
    data: list[DatasetPublic]
    count: int


class DatasetPreview(SQLModel):
    id: uuid.UUID
    format: DatasetFormat
    rows: list[dict[str, Any]]


# ---------------------------------------------------------------- experiments


class ExperimentStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (self.succeeded, self.failed, self.cancelled)


class ExperimentBase(SQLModel):
    name: str = Field(min_length=1, max_length=200)
    base_model: str = Field(min_length=1, max_length=500, description="Hub id or local path")
    dataset_id: uuid.UUID = Field(foreign_key="dataset.id")
    recipe: str | None = Field(None, max_length=100, description="Preset in config/recipes")


class Experiment(ExperimentBase, table=True):
    __table_args__ = (Index("ix_experiment_team_status", "team_id", "status"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    queue: str = Field(max_length=100)
    status: ExperimentStatus = Field(default=ExperimentStatus.queued, index=True)
    # Attempt number of the run that owns the job; every worker write is fenced on it.
    attempt: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    stop_requested: bool = False
    event_seq: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    worker: str | None = Field(default=None, max_length=200)
    pid: int | None = None
    heartbeat_at: datetime | None = None
    error: str | None = None
    log_tail: str | None = None
    final_metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ExperimentCreate(SQLModel):
    name: str = Field(min_length=1, max_length=200)
    base_model: str = Field(min_length=1, max_length=500)
    dataset_id: uuid.UUID
    recipe: str | None = Field(None, max_length=100)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = Field(None, description="Training queue (GPU class); default from settings")
    start: bool = Field(True, description="Queue the run now; false leaves it for /start")


class ExperimentPublic(ExperimentBase):
    id: uuid.UUID
    team_id: uuid.UUID
    hyperparameters: dict[str, Any]
    queue: str
    status: ExperimentStatus
    attempt: int
    stop_requested: bool
    worker: str | None
    error: str | None
    log_tail: str | None
    final_metrics: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExperimentsPublic(SQLModel):
    data: list[ExperimentPublic]
    count: int


class ExperimentEvent(SQLModel, table=True):
    """Everything a watcher sees, in order: status changes, metrics, checkpoints, logs.

    ``seq`` is per experiment and gap-free, so SSE clients resume from Last-Event-ID.
    """

    __tablename__ = "experiment_event"
    __table_args__ = (UniqueConstraint("experiment_id", "seq", name="uq_event_experiment_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    experiment_id: uuid.UUID = Field(foreign_key="experiment.id", index=True)
    seq: int
    type: str = Field(max_length=32)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class EventPublic(SQLModel):
    seq: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class MetricsPublic(SQLModel):
    data: list[EventPublic]
    count: int


class ArtifactPublic(SQLModel):
    path: str
    size_bytes: int


class ArtifactsPublic(SQLModel):
    data: list[ArtifactPublic]
    count: int


# ---------------------------------------------------------------- outbox


class OutboxMessage(SQLModel, table=True):
    """A Celery send committed in the same transaction as the row it is about."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    task_name: str = Field(max_length=200)
    queue: str = Field(max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = Field(default=None, index=True)
    send_attempts: int = 0
    last_error: str | None = None
