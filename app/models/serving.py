"""Serving: deployments, the inference worker fleet and its commands and replies, A/B tests."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import StringConstraints
from sqlalchemy import JSON, Column, Integer, String, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.common import utcnow

# sqlmodel's Field(regex=...) is not enforced on plain (non-table) models under pydantic 2; these are.
ModelName = Annotated[str, StringConstraints(max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")]
MAX_PROMPT_CHARS = 20_000
Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


MAX_REPLICAS = 16


class DeploymentStatus(StrEnum):
    active = "active"
    retired = "retired"


class PlacementState(StrEnum):
    loading = "loading"  # assigned; the worker loads the weights (at once, or with its first request)
    ready = "ready"


class Deployment(SQLModel, table=True):
    """A model served on the inference queue: a base model, plus an experiment's adapter or not.
    ``name`` is what OpenAI clients pass as ``model`` (unique within the team)."""

    __table_args__ = (UniqueConstraint("team_id", "name", name="uq_deployment_team_name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    name: str = Field(max_length=100)
    experiment_id: uuid.UUID | None = Field(default=None, foreign_key="experiment.id")
    base_model: str = Field(max_length=500)
    adapter_prefix: str | None = Field(default=None, max_length=300, description="Storage prefix of the adapter")
    status: DeploymentStatus = DeploymentStatus.active
    created_by: uuid.UUID | None = Field(default=None, foreign_key="app_user.id")
    created_at: datetime = Field(default_factory=utcnow)
    retired_at: datetime | None = None
    # Inference workers its base model is placed on (at least; the base model's placement serves the
    # highest `replicas` among its active deployments).
    replicas: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))


class DeploymentCreate(SQLModel):
    name: ModelName | None = Field(None, description="The OpenAI `model` name; default from the run")
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS, description="Inference workers its base model is placed on")
    merged: bool = Field(False, description="Serve a merge_adapter run's merged weights as a base model of its own")
    experiment_id: uuid.UUID | None = Field(None, description="Serve this succeeded experiment's adapter")
    base_model: str | None = Field(None, min_length=1, max_length=500, description="Or serve a base model as is")


class DeploymentPublic(SQLModel):
    id: uuid.UUID
    team_id: uuid.UUID
    name: str
    model: str = Field(description="Pass this as `model` to the OpenAI client")
    experiment_id: uuid.UUID | None
    base_model: str
    status: DeploymentStatus
    replicas: int = 1
    created_at: datetime
    retired_at: datetime | None


class DeploymentsPublic(SQLModel):
    data: list[DeploymentPublic]
    count: int


class UsagePublic(SQLModel):
    window_s: int = Field(description="The window the rates are over")
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    requests_per_minute: float
    completion_tokens_per_second: float


class PlacementPublic(SQLModel):
    worker: str
    state: PlacementState
    placed_at: datetime
    ready_at: datetime | None
    load_seconds: float | None = Field(None, description="How long the worker took to load the base model")


class DeploymentStatusPublic(SQLModel):
    id: uuid.UUID
    model: str
    status: DeploymentStatus
    replicas: int
    workers_alive: int = Field(description="Inference workers heartbeating now")
    loaded_on: list[str] = Field(description="Workers that hold this deployment's weights in memory")
    placement: list[PlacementPublic] = Field(
        default_factory=list, description="Live workers its base model is placed on: loading or ready"
    )
    usage: UsagePublic | None = Field(None, description="Requests and tokens over the last minutes, all API replicas")


class DeploymentUsage(SQLModel, table=True):
    """What a deployment answered in one minute, summed over API replicas: its request and token rates.
    Each API process counts in memory and adds its counts here every relay pass (app.services.usage)."""

    __tablename__ = "deployment_usage"

    deployment_id: uuid.UUID = Field(foreign_key="deployment.id", primary_key=True)
    minute: datetime = Field(primary_key=True, description="Start of the minute (UTC)")
    requests: int = 0
    errors: int = Field(0, description="Requests answered with an error")
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ModelPlacement(SQLModel, table=True):
    """A base model placed on an inference worker: requests for it go to that worker's own queue.
    Decided on the API side (`app.services.placement`); the worker loads what is placed on it and reports
    when it is ready."""

    __tablename__ = "model_placement"

    base_model: str = Field(primary_key=True, max_length=500)
    worker: str = Field(primary_key=True, max_length=200)
    state: PlacementState = Field(default=PlacementState.loading, sa_column=Column(String(16), nullable=False))
    placed_at: datetime = Field(default_factory=utcnow)
    ready_at: datetime | None = None
    load_seconds: float | None = None


class InferenceWorker(SQLModel, table=True):
    """One inference worker process, as it last reported itself (every heartbeat)."""

    __tablename__ = "inference_worker"

    name: str = Field(primary_key=True, max_length=200)
    hostname: str = Field(max_length=200)
    pid: int
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow, index=True)
    stats: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class TrainingWorker(SQLModel, table=True):
    """One training worker (a GPU group), as it last reported itself: its queue (GPU class) and GPUs."""

    __tablename__ = "training_worker"

    name: str = Field(primary_key=True, max_length=200)
    hostname: str = Field(max_length=200)
    pid: int
    queues: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    gpu_ids: str = Field(default="", max_length=200, description="CUDA_VISIBLE_DEVICES it owns; empty on CPU")
    slots: int = Field(default=1, description="Processes a job may run: its GPUs, or its CPU cores on a CPU worker")
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow, index=True)


class InferenceCommand(SQLModel, table=True):
    """An instruction for every inference worker (e.g. unload a model); workers apply each id once."""

    __tablename__ = "inference_command"

    id: int | None = Field(default=None, primary_key=True)
    action: str = Field(max_length=32)
    target: str = Field(max_length=500, description="Adapter name (deployment id) or base model")
    created_at: datetime = Field(default_factory=utcnow)


class InferenceReply(SQLModel, table=True):
    """Replies from workers to the API when there is no Redis (the embedded default)."""

    __tablename__ = "inference_reply"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(max_length=64, index=True)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class AbTest(SQLModel, table=True):
    __tablename__ = "ab_test"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    name: str = Field(max_length=200)
    deployment_a: uuid.UUID = Field(foreign_key="deployment.id")
    deployment_b: uuid.UUID = Field(foreign_key="deployment.id")
    judge_deployment: uuid.UUID | None = Field(default=None, foreign_key="deployment.id")
    prompts: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    dataset_id: uuid.UUID | None = Field(default=None, foreign_key="dataset.id")
    max_tokens: int = 64
    results: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    compared_at: datetime | None = None


class AbTestCreate(SQLModel):
    name: str = Field(min_length=1, max_length=200)
    deployment_a: uuid.UUID
    deployment_b: uuid.UUID
    judge_deployment: uuid.UUID | None = Field(None, description="A third deployment that picks the better answer")
    prompts: list[Prompt] = Field(default_factory=list, max_length=500, description="Prompts to run through both")
    dataset_id: uuid.UUID | None = Field(None, description="Or: prompts and eval loss from this dataset's eval split")
    max_tokens: int = Field(64, ge=1, le=4096)


class AbTestPublic(SQLModel):
    id: uuid.UUID
    team_id: uuid.UUID
    name: str
    deployment_a: uuid.UUID
    deployment_b: uuid.UUID
    judge_deployment: uuid.UUID | None
    prompts: list[str]
    dataset_id: uuid.UUID | None
    max_tokens: int
    results: dict[str, Any] | None
    created_at: datetime
    compared_at: datetime | None


class AbTestsPublic(SQLModel):
    data: list[AbTestPublic]
    count: int
