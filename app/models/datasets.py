"""Datasets: uploaded rows in one of the supported formats, split into train and eval."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from sqlalchemy import JSON, BigInteger, Column
from sqlmodel import Field, SQLModel

from app.models.common import utcnow


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
    # Lineage: the version this one was made from, and how (a curation's filters, or the A/B test whose
    # votes it holds). Deleting a parent keeps its children (the link is then left dangling on purpose:
    # the origin still says what was done).
    parent_id: uuid.UUID | None = Field(default=None, index=True)
    origin: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


# Bounds on an inline dataset's shape (its size is bounded by api.max_request_bytes, its row count by
# api.max_inline_rows): no row format has more than a handful of keys.
MAX_INLINE_ROWS = 1_000_000
MAX_ROW_KEYS = 100


class DatasetCreate(DatasetBase):
    rows: list[Annotated[dict[str, Any], Field(max_length=MAX_ROW_KEYS)]] = Field(
        max_length=MAX_INLINE_ROWS, description="Rows in one of the supported formats"
    )
    format: DatasetFormat | None = Field(None, description="Detected when omitted")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class DatasetCurate(SQLModel):
    """Filters that make a new version of a dataset (applied in this order; every one optional)."""

    name: str | None = Field(None, min_length=1, max_length=200, description="Default: '<parent> (curated)'")
    min_answer_chars: int = Field(
        0, ge=0, le=100_000, description="Drop rows whose answer (stripped) is shorter; uploads refuse empty ones"
    )
    base_model: str | None = Field(
        None, min_length=1, max_length=500, description="A local model whose tokenizer counts min/max_tokens"
    )
    min_tokens: int | None = Field(None, ge=0, le=10_000_000, description="Drop rows with fewer tokens")
    max_tokens: int | None = Field(None, ge=1, le=10_000_000, description="Drop rows with more tokens")
    dedup: Literal["none", "exact", "near"] = Field(
        "exact", description="exact: identical rows; near: also rows similar by MinHash over word 3-grams"
    )
    near_threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity that makes a near duplicate"
    )
    sample: int | None = Field(None, ge=1, le=10_000_000, description="Keep this many rows, chosen at random")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the sample")
    eval_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="Re-split; default the parent's")


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
    parent_id: uuid.UUID | None = None
    origin: dict[str, Any] | None = Field(None, description="How this version was made from its parent")


class DatasetsPublic(SQLModel):
    data: list[DatasetPublic]
    count: int


class DatasetPreview(SQLModel):
    id: uuid.UUID
    format: DatasetFormat
    rows: list[dict[str, Any]]


class MaskedToken(SQLModel):
    text: str
    trained: bool = Field(description="Whether the loss sees this token")


class RowMask(SQLModel):
    """One row as the trainer will see it with the chosen base model."""

    row: int = Field(description="1-based row number in the dataset")
    rendered: str | None = Field(description="The row as the model reads it (chat rows through the template)")
    trained_text: list[str] = Field(description="The parts the loss sees, in order")
    tokens: list[MaskedToken] | None = Field(description="Each token and whether it is trained (needs tokenizer.json)")
    trained_tokens: int | None = None
    problem: str | None = Field(None, description="Why the answers cannot be located (training would be refused)")


class ReportStatus(StrEnum):
    pending = "pending"
    ready = "ready"
    failed = "failed"


class TokenStats(SQLModel):
    total: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int
    histogram: list[dict[str, int]] = Field(description="Rows per token-length bin: start (inclusive), end, count")


class DatasetReport(SQLModel):
    """What training on this dataset with this base model will meet (see app/datasets/report.py). While a
    large dataset's report is computed by a worker, ``status`` is pending and only the request is filled."""

    id: uuid.UUID
    format: DatasetFormat
    base_model: str
    train_on_prompt: bool
    max_seq_length: int | None = None
    status: ReportStatus = ReportStatus.ready
    error: str | None = None
    rows: list[RowMask] = Field(default_factory=list, description="The first rows, with what the loss sees")
    rows_total: int | None = None
    tokens: TokenStats | None = Field(None, description="Token lengths as the trainer sees the rows")
    truncation: dict[str, Any] | None = Field(
        None, description="Rows longer than max_seq_length, and cut before any answer"
    )
    duplicates: dict[str, Any] | None = Field(None, description="Exact groups and near pairs (MinHash), 1-based rows")
    short_answers: dict[str, Any] | None = None
    anomalies: dict[str, Any] | None = Field(
        None, description="Encoding (U+FFFD, mojibake, control) and script outliers"
    )
    estimate: dict[str, Any] | None = Field(
        None, description="Estimated peak memory and time per epoch, with the inputs and assumptions behind them"
    )
    blocking: list[str] = Field(default_factory=list, description="Problems that make training fail or useless")
    warnings: list[str] = Field(default_factory=list)


class DatasetReportRecord(SQLModel, table=True):
    """A computed dataset report, kept by what it depends on (``cache_key``: the rows' hash, the tokenizer
    and config files, the length and the training shape), so asking again costs one lookup."""

    __tablename__ = "dataset_report"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    dataset_id: uuid.UUID = Field(foreign_key="dataset.id", index=True)
    cache_key: str = Field(max_length=64, unique=True)
    status: ReportStatus = ReportStatus.pending
    request: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
