"""SQLModel tables and API schemas.

Families follow the FastAPI template: ``XBase`` (shared fields), ``X`` (table), ``XCreate`` (request
body), ``XPublic`` / ``XsPublic`` (responses). Every user-owned row carries ``team_id``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import StringConstraints
from sqlalchemy import JSON, BigInteger, Column, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

# The team created by the first migration; the first admin joins it.
DEFAULT_TEAM_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- accounts and teams


class Role(StrEnum):
    """Per-team roles, each including the one below: viewers read, trainers submit and deploy,
    admins manage members, keys and quotas."""

    viewer = "viewer"
    trainer = "trainer"
    admin = "admin"

    def includes(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


class Team(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=100, unique=True)
    # None = the platform default from settings.quotas
    max_active_jobs: int | None = None
    max_queued_jobs: int | None = None
    max_inflight_requests: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class TeamCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)


class TeamPublic(SQLModel):
    id: uuid.UUID
    name: str
    role: Role | None = Field(None, description="The caller's role in this team")
    max_active_jobs: int
    max_queued_jobs: int
    max_inflight_requests: int
    created_at: datetime


class TeamsPublic(SQLModel):
    data: list[TeamPublic]
    count: int


class QuotaUpdate(SQLModel):
    max_active_jobs: int | None = Field(None, ge=0, description="Queued + running experiments; null = default")
    max_queued_jobs: int | None = Field(None, ge=0, description="Queued experiments; null = default")
    max_inflight_requests: int | None = Field(None, ge=0, description="Concurrent /v1 requests; null = default")


class User(SQLModel, table=True):
    __tablename__ = "app_user"  # "user" is reserved in Postgres

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(max_length=320, unique=True, index=True)
    full_name: str = Field(default="", max_length=200)
    hashed_password: str = Field(max_length=200)
    is_active: bool = True
    is_superuser: bool = Field(False, description="Platform admin: creates teams, sets any quota")
    password_changed_at: datetime | None = Field(default=None, description="Login tokens issued before it are refused")
    created_at: datetime = Field(default_factory=utcnow)


class UserPublic(SQLModel):
    id: uuid.UUID
    email: str
    full_name: str
    is_active: bool
    is_superuser: bool
    created_at: datetime


class UserMe(UserPublic):
    teams: list[TeamPublic]


class UserUpdateMe(SQLModel):
    full_name: str | None = Field(None, max_length=200)
    current_password: str | None = Field(None, max_length=200)
    new_password: str | None = Field(None, min_length=8, max_length=200)


class Membership(SQLModel, table=True):
    team_id: uuid.UUID = Field(foreign_key="team.id", primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", primary_key=True, index=True)
    role: Role
    created_at: datetime = Field(default_factory=utcnow)


class MemberPublic(SQLModel):
    user_id: uuid.UUID
    email: str
    full_name: str
    role: Role
    created_at: datetime


class MembersPublic(SQLModel):
    data: list[MemberPublic]
    count: int


class MemberUpdate(SQLModel):
    role: Role


class Invitation(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    email: str = Field(max_length=320)
    role: Role
    token_hash: str = Field(max_length=64, unique=True)
    invited_by: uuid.UUID = Field(foreign_key="app_user.id")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    accepted_at: datetime | None = None


class InvitationCreate(SQLModel):
    email: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")] = Field(min_length=3, max_length=320)
    role: Role = Role.trainer


class InvitationPublic(SQLModel):
    id: uuid.UUID
    team_id: uuid.UUID
    email: str
    role: Role
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None


class InvitationCreated(InvitationPublic):
    token: str = Field(description="Shown once: send it to the invitee, who accepts with it")


class InvitationsPublic(SQLModel):
    data: list[InvitationPublic]
    count: int


class InvitationAccept(SQLModel):
    token: str = Field(min_length=10, max_length=200)
    password: str | None = Field(None, min_length=8, max_length=200, description="Sets up a new account")
    full_name: str = Field("", max_length=200)


class ApiKey(SQLModel, table=True):
    """A credential for scripts and the OpenAI client. Only a SHA-256 of the secret is stored: the key
    has 256 random bits, so a fast hash is safe (argon2 is for low-entropy passwords)."""

    __tablename__ = "api_key"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    name: str = Field(max_length=100)
    role: Role
    prefix: str = Field(max_length=16, description="First characters, to recognise a key in lists")
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class ApiKeyCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)
    role: Role = Field(Role.trainer, description="At most the creator's own role")


class ApiKeyPublic(SQLModel):
    id: uuid.UUID
    team_id: uuid.UUID
    user_id: uuid.UUID
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="Shown once; only its hash is stored")


class ApiKeysPublic(SQLModel):
    data: list[ApiKeyPublic]
    count: int


class Token(SQLModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int


class LoginThrottle(SQLModel, table=True):
    """Failed logins per email and per client address, for the login rate limit."""

    __tablename__ = "login_throttle"

    key: str = Field(primary_key=True, max_length=400)
    failures: int = 0
    window_start: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Who did what to which object; written in the same transaction as the change."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_team_created", "team_id", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id")
    actor_user_id: uuid.UUID | None = Field(default=None, foreign_key="app_user.id")
    actor_api_key_id: uuid.UUID | None = Field(default=None, foreign_key="api_key.id")
    action: str = Field(max_length=64, description="e.g. experiment.create, member.remove")
    target_type: str = Field(max_length=32)
    target_id: str = Field(max_length=64)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class AuditEventPublic(SQLModel):
    id: int
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str
    data: dict[str, Any]
    created_at: datetime


class AuditEventsPublic(SQLModel):
    data: list[AuditEventPublic]
    count: int


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
    created = "created"  # submitted with start=false; /start queues it
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


# ---------------------------------------------------------------- serving


# sqlmodel's Field(regex=...) is not enforced on plain (non-table) models under pydantic 2; these are.
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")]


class DeploymentStatus(StrEnum):
    active = "active"
    retired = "retired"


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


class DeploymentCreate(SQLModel):
    name: ModelName | None = Field(None, description="The OpenAI `model` name; default from the run")
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
    created_at: datetime
    retired_at: datetime | None


class DeploymentsPublic(SQLModel):
    data: list[DeploymentPublic]
    count: int


class DeploymentStatusPublic(SQLModel):
    id: uuid.UUID
    model: str
    status: DeploymentStatus
    workers_alive: int = Field(description="Inference workers heartbeating now")
    loaded_on: list[str] = Field(description="Workers that hold this deployment's weights in memory")


class InferenceWorker(SQLModel, table=True):
    """One inference worker process, as it last reported itself (every heartbeat)."""

    __tablename__ = "inference_worker"

    name: str = Field(primary_key=True, max_length=200)
    hostname: str = Field(max_length=200)
    pid: int
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow, index=True)
    stats: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


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
    prompts: list[str] = Field(default_factory=list, max_length=500, description="Prompts to run through both")
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
