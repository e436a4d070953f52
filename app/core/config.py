"""Settings: one typed class, env prefix ``STUDIO_``, nested sections (``STUDIO_DATABASE__URL``).

Defaults are the embedded deployment (SQLite, kombu's SQLAlchemy transport, polling for live
events, a local storage directory), all under ``STUDIO_DATA_DIR``. Production swaps in Postgres,
Redis and S3 by setting URLs; no code changes. Nothing else in the project reads ``os.environ``
for configuration.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatabaseSettings(BaseModel):
    url: str = Field("", description="SQLAlchemy URL; default sqlite:///$STUDIO_DATA_DIR/studio.db")
    echo: bool = Field(False, description="Log every SQL statement")
    # Pool settings are for Postgres (SQLite keeps SQLAlchemy's own pool). See docs/architecture.md,
    # "Database connections": pool_size + max_overflow matches the API's 40 worker threads. Size
    # Postgres' max_connections for (API processes + workers) x (pool_size + max_overflow).
    pool_size: int = Field(20, ge=1, description="Postgres: connections kept open per process")
    max_overflow: int = Field(20, ge=0, description="Postgres: extra connections opened under load, closed after")
    pool_timeout_s: float = Field(
        5.0, gt=0, description="Postgres: seconds a thread waits for a free connection before 503 (overload)"
    )
    queue_timeout_s: float = Field(
        15.0,
        gt=0,
        description="API: seconds a request waits for its turn at the pool (on the event loop, holding no "
        "thread or connection) before 503",
    )
    pool_recycle_s: int = Field(
        1800, description="Postgres: replace connections older than this (outlive proxies' idle cuts); -1 = never"
    )
    connect_timeout_s: int = Field(5, ge=2, description="Postgres: seconds to open a connection before giving up")


class BrokerSettings(BaseModel):
    url: str = Field("", description="Celery broker URL; default kombu's SQLAlchemy transport on SQLite")
    visibility_timeout_s: int = Field(
        6 * 3600,
        description="Redis: seconds before an unacked message is redelivered. Redelivery is "
        "harmless (jobs are claimed by attempt), so this only bounds recovery delay.",
    )


class EventsSettings(BaseModel):
    redis_url: str = Field("", description="Redis URL for live notifications; empty = clients poll the database")
    poll_interval_s: float = Field(1.0, description="How often SSE streams re-read the database")


class StorageSettings(BaseModel):
    backend: Literal["local", "s3"] = "local"
    root: str = Field("", description="Local storage directory; default $STUDIO_DATA_DIR/storage")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = Field("", description="For MinIO or other S3-compatible stores")
    s3_region: str = ""


class TrainQueue(BaseModel):
    name: str = Field(description="Celery queue name, e.g. train.h100")
    cuda: bool = Field(description="Workers on this queue have CUDA GPUs (QLoRA needs one)")


class TrainingSettings(BaseModel):
    queues: list[TrainQueue] = Field(
        default_factory=lambda: [TrainQueue(name="train.cpu", cuda=False)],
        description="Training queues, one per GPU class",
    )
    default_queue: str = "train.cpu"
    work_dir: str = Field("", description="Scratch dir for runs; default $STUDIO_DATA_DIR/runs")
    heartbeat_interval_s: float = 2.0
    stale_after_s: float = Field(120.0, description="A running job whose heartbeat is older than this is requeued")
    stop_grace_s: float = Field(10.0, description="Seconds a stopped trainer gets to exit before SIGKILL")
    stall_after_s: float = Field(
        3600.0, description="A supervisor stuck this long (a hung upload) gives its job up to be requeued"
    )
    log_tail_lines: int = Field(50, description="Log lines kept on the row when a run fails")
    max_steps_cap: int = Field(100_000, description="Largest max_steps a request may ask for")
    max_seq_length_cap: int = Field(32_768, description="Largest max_seq_length allowed")
    python: str = Field("", description="Interpreter for the trainer child; default this one")
    max_attempts: int = Field(
        3, ge=1, description="Worker losses (dead or silent worker) a job survives before it fails; /start resets"
    )
    requeue_backoff_s: float = Field(
        10.0, ge=0, description="Wait before re-running a job whose worker was lost; doubles per loss (max 10 min)"
    )
    handoff_grace_s: float = Field(
        120.0, gt=0, description="A worker shutting down gives its trainer this long to checkpoint before handing off"
    )
    resend_after_s: float = Field(
        300.0,
        gt=0,
        description="A job queued this long without a claim is sent again (lost broker message); the interval "
        "doubles per resend",
    )
    db_retry_s: float = Field(
        120.0, ge=0, description="How long a running job retries database errors (with backoff) before giving up"
    )
    fine_tuning_recipe: str = Field(
        "tiny_lora_cpu",
        description="Recipe behind /v1/fine_tuning jobs (method supervised): what `auto` and a "
        "learning_rate_multiplier of 1 mean. Set llama_lora on a GPU fleet",
    )
    fine_tuning_dpo_recipe: str = Field("tiny_dpo_cpu", description="The same, for method dpo")


class ApiSettings(BaseModel):
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest dataset upload (413)")
    metrics_token: str = Field(
        "", description="Bearer token a Prometheus scraper sends to GET /metrics (else a platform admin's login)"
    )
    max_inline_rows: int = Field(50_000, description="Most rows in an inline dataset body")
    # Uploads are parsed as streams, so the API's memory does not grow with these (docs/reliability.md,
    # "Bounded uploads"); they bound the work, the disk, and what training later reads back into memory.
    max_dataset_rows: int = Field(
        500_000, ge=1, description="Most rows in one dataset (422); a Parquet file's footer is checked before its data"
    )
    max_row_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest row: a JSONL line, a JSON array element, a CSV record (422)"
    )
    max_cell_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest string value in a row (UTF-8 bytes), CSV fields included (422)"
    )
    max_json_depth: int = Field(32, ge=2, le=256, description="Deepest nesting of a row's JSON, {} being 1 (422)")
    max_dataset_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1024,
        description="Largest dataset once stored as JSON lines (422): Parquet and CSV may grow when converted",
    )
    parquet_memory_bytes: int = Field(
        512 * 1024 * 1024,
        ge=64 * 1024 * 1024,
        description="Memory cap (RLIMIT_DATA) of the child process that decodes a Parquet upload; beyond it, 422",
    )
    max_request_bytes: int = Field(64 * 1024 * 1024, description="Largest request body except uploads (413)")
    report_inline_rows: int = Field(
        20_000,
        ge=0,
        description="Datasets up to this many rows get their report computed in the request; "
        "larger ones by a worker on the default queue",
    )
    relay_interval_s: float = Field(0.5, description="Outbox relay poll interval")
    models_dir: str = Field("", description="Extra directory where base_model names resolve to local models")
    allowed_base_models: list[str] = Field(
        default_factory=list,
        description="Hub ids (or glob patterns, e.g. meta-llama/*) a base_model may name; empty = any Hub id. "
        "Local models are allowed only under models_dir (and, in development, outside the studio's own dirs)",
    )
    idempotency_ttl_s: int = Field(
        24 * 3600,
        ge=1,
        description="How long a creating POST's Idempotency-Key is remembered (its response replayed); "
        "after that the same key creates anew",
    )


class InferenceSettings(BaseModel):
    concurrency: int = Field(64, ge=1, description="Requests one inference worker takes at once (its threads)")
    max_batch_size: int = Field(64, ge=1, description="Most sequences decoded together in one step")
    max_adapters: int = Field(8, ge=1, description="LoRA adapters kept loaded per base model (LRU)")
    max_base_models: int = Field(
        1, ge=1, description="Base models one worker keeps loaded at once (placement puts no more on it)"
    )
    routing: Literal["placed", "shared"] = Field(
        "placed",
        description="placed: a request goes to a worker its base model is placed on (app/services/placement.py); "
        "shared: to the one shared queue, whichever worker is free (the old way, kept for comparison)",
    )
    device: str = Field("", description="cuda, cpu, ...; default cuda when available")
    decode: Literal["dynamic", "static", "compiled"] = Field(
        "static",
        description="Decode path of the engines: 'static' (preallocated KV slots and stacked LoRA, eager), "
        "'compiled' (the same step under torch.compile, CUDA graphs on CUDA, 8 tokens per call; compiles at "
        "engine start), "
        "'dynamic' (the padded DynamicCache path). Models outside the Llama family always use 'dynamic'",
    )
    static_max_len: int = Field(
        4096,
        ge=64,
        description="Tokens (prompt + completion) one request may hold on the static/compiled paths: the KV slots "
        "take max_batch_size x this x layers x kv_heads x head_dim x 2 x dtype bytes, allocated at engine start",
    )
    cache_dir: str = Field("", description="Where workers keep downloaded adapters; default $STUDIO_DATA_DIR/adapters")
    heartbeat_interval_s: float = Field(1.0, description="How often a worker reports its stats")
    worker_stale_after_s: float = Field(10.0, description="A worker silent this long is lost; its requests fail")
    queue_timeout_s: float = Field(120.0, description="503 when no worker takes a request within this")
    request_timeout_s: float = Field(600.0, description="504 when a generation takes longer than this")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for chat requests that give none")
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Most characters in a /v1 request's prompt (all messages' contents together); longer is a "
        "400 from the API, before any worker tokenizes it",
    )
    max_messages: int = Field(1000, ge=1, description="Most messages in one /v1 chat request (400 beyond)")


class AuthSettings(BaseModel):
    jwt_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="JWT signing keys by key id (JSON object, each >= 32 chars). Tokens signed with any listed "
        "key verify; drop a key id to revoke its tokens. Empty in development = a key generated under data_dir",
    )
    jwt_active_kid: str = Field("", description="Key id that signs new tokens; default the last listed")
    issuer: str = Field("fine-tuning-studio", description="JWT `iss`, checked on every request")
    audience: str = Field("studio-api", description="JWT `aud`, checked on every request")
    access_token_ttl_s: int = Field(8 * 3600, ge=60, description="Lifetime of a login token")
    login_max_failures: int = Field(20, ge=1, description="Failed logins (per email, per client) before 429")
    login_window_s: int = Field(900, ge=1, description="Window for counting failed logins")
    invitation_ttl_s: int = Field(7 * 24 * 3600, description="How long an invitation can be accepted")


class QuotaSettings(BaseModel):
    max_active_jobs: int = Field(8, ge=1, description="Per team: queued + running experiments (429 beyond)")
    max_queued_jobs: int = Field(32, ge=1, description="Per team: experiments waiting in the queue (429 beyond)")
    max_inflight_requests: int = Field(64, ge=1, description="Per team: /v1 generation requests at once (429 beyond)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STUDIO_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(Path(".studio"), description="Where embedded state lives")
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    events: EventsSettings = EventsSettings()
    storage: StorageSettings = StorageSettings()
    training: TrainingSettings = TrainingSettings()
    api: ApiSettings = ApiSettings()
    auth: AuthSettings = AuthSettings()
    inference: InferenceSettings = InferenceSettings()
    quotas: QuotaSettings = QuotaSettings()
    admin_email: str = Field("", description="First start with no users: create this platform admin")
    admin_password: SecretStr = Field(SecretStr(""), description="Password for admin_email")

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data = self.data_dir.resolve()
        if not self.database.url:
            self.database.url = f"sqlite:///{data / 'studio.db'}"
        if not self.broker.url:
            self.broker.url = f"sqla+sqlite:///{data / 'broker.db'}"
        if not self.storage.root:
            self.storage.root = str(data / "storage")
        if not self.training.work_dir:
            self.training.work_dir = str(data / "runs")
        if not self.inference.cache_dir:
            self.inference.cache_dir = str(data / "adapters")
        names = [q.name for q in self.training.queues]
        if self.training.default_queue not in names:
            raise ValueError(f"training.default_queue {self.training.default_queue!r} is not one of {names}")
        if self.environment == "production" and self.database.url.startswith("sqlite"):
            raise ValueError("database.url: production needs Postgres, not SQLite")
        if self.environment == "production" and not self.auth.jwt_keys:
            raise ValueError("auth.jwt_keys: production needs signing keys shared by every API process")
        for kid, key in self.auth.jwt_keys.items():
            if len(key.get_secret_value()) < 32:
                raise ValueError(f"auth.jwt_keys.{kid}: a signing key needs at least 32 characters")
        if self.auth.jwt_active_kid and self.auth.jwt_active_kid not in self.auth.jwt_keys:
            raise ValueError(f"auth.jwt_active_kid {self.auth.jwt_active_kid!r} is not in auth.jwt_keys")
        return self

    def train_queue(self, name: str) -> TrainQueue | None:
        return next((q for q in self.training.queues if q.name == name), None)


@lru_cache
def get_settings() -> Settings:
    return Settings()
