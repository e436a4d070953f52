"""Experiments (fine-tuning runs), their ordered events, and their artifacts."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, Boolean, Column, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.common import utcnow
from app.models.evaluation import EvalSpec

MAX_LABELS = 16  # as OpenAI's `metadata`
MAX_GPUS = 64


class ExperimentStatus(StrEnum):
    created = "created"  # submitted with start=false; /start queues it
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    paused = "paused"  # checkpointed and off the GPU; /start (or the fine-tuning API's resume) continues it

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
    # GPUs (processes, on a CPU queue) the run takes: more than 1 runs under `accelerate launch`.
    gpus: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))
    status: ExperimentStatus = Field(default=ExperimentStatus.queued, index=True)
    # Attempt number of the run that owns the job; every worker write is fenced on it.
    attempt: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    stop_requested: bool = False
    # The user asked to pause: the supervisor checkpoints, ends the attempt and leaves the job paused.
    pause_requested: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="0"))
    # Set when the worker running the job is shutting down: its supervisor checkpoints and hands the job back.
    handoff_requested: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="0"))
    # Attempts lost to a dead or silent worker since the user last (re)started the job; capped by
    # training.max_attempts, so a job that takes its worker down fails instead of looping.
    worker_losses: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    queued_at: datetime | None = None  # last queued; a job queued too long without a claim is re-sent
    queue_resends: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
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
    # Lineage: where the run came from (dataset version and hash, recipe, base model fingerprint, the
    # libraries of the worker that trained it) and the run it was cloned from.
    parent_experiment_id: uuid.UUID | None = Field(default=None, index=True)
    lineage: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    # What the dataset report found at submit that does not block training (duplicates, cut rows, ...).
    warnings: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    # Evaluate on this dataset's rows instead of a held-out share of the training dataset.
    validation_dataset_id: uuid.UUID | None = Field(default=None, foreign_key="dataset.id")
    # The caller's own key-value pairs (the fine-tuning API's `metadata`).
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    # The OpenAI `model` name the run answers to once it succeeds (jobs made through /v1/fine_tuning).
    fine_tuned_model: str | None = Field(default=None, max_length=100, index=True)


class ExperimentCreate(SQLModel):
    name: str = Field(min_length=1, max_length=200)
    base_model: str = Field(min_length=1, max_length=500)
    dataset_id: uuid.UUID
    recipe: str | None = Field(None, max_length=100)
    # Validated into the typed Hyperparameters by the service; here only the number of keys is bounded.
    hyperparameters: dict[str, Any] = Field(default_factory=dict, max_length=100)
    queue: str | None = Field(None, max_length=100, description="Training queue (GPU class); default from settings")
    gpus: int = Field(1, ge=1, le=MAX_GPUS, description="GPUs it trains on (processes on a CPU queue)")
    start: bool = Field(True, description="Queue the run now; false leaves it for /start")
    eval: EvalSpec | None = Field(None, description="Evaluate the run on its held-out rows once it succeeds")
    validation_dataset_id: uuid.UUID | None = Field(
        None, description="Evaluate on this dataset (same format) instead of a held-out share of dataset_id"
    )
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS, description="Your own key-value pairs")

    @field_validator("labels", mode="before")
    @classmethod
    def _few_labels(cls, value: Any) -> Any:  # counted before the values are checked, so the 422 names `labels`
        if isinstance(value, dict) and len(value) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels")
        return value


class ExperimentClone(SQLModel):
    """A new experiment from another's resolved settings, with some changed."""

    name: str | None = Field(None, min_length=1, max_length=200, description="Default: '<source> (clone)'")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, max_length=100, description="Overrides")
    dataset_id: uuid.UUID | None = Field(None, description="Default: the source's dataset")
    base_model: str | None = Field(None, min_length=1, max_length=500, description="Default: the source's")
    queue: str | None = Field(None, max_length=100)
    start: bool = True


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
    parent_experiment_id: uuid.UUID | None = None
    warnings: list[str] = Field(default_factory=list, description="What the dataset report found at submit")
    pause_requested: bool = False
    gpus: int = 1
    waiting_reason: str | None = Field(None, description="Why a queued run is not running yet, when it cannot")
    validation_dataset_id: uuid.UUID | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    fine_tuned_model: str | None = Field(None, description="The OpenAI model name it answers to once succeeded")


class LineageNode(SQLModel):
    id: str = Field(description="'<kind>:<id>'")
    kind: str = Field(description="experiment, dataset, ab_test, deployment or base_model")
    label: str
    data: dict[str, Any] = Field(default_factory=dict)


class LineageEdge(SQLModel):
    source: str
    target: str
    relation: str = Field(
        description="trained_on, derived_from, votes_of, compared, cloned_from, fine_tunes, deployed_as"
    )


class Lineage(SQLModel):
    experiment_id: uuid.UUID
    nodes: list[LineageNode]
    edges: list[LineageEdge]


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
