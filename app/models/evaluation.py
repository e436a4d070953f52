"""Evaluation after training: task metrics against the held-out references, and an optional LLM judge."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import StringConstraints
from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from app.models.common import utcnow

Metric = Literal["exact_match", "rouge_l", "bleu"]


class EvalSpec(SQLModel):
    """What to measure once the run has succeeded, on its eval split (rows with a reference answer)."""

    metrics: list[Metric] = Field(
        default_factory=lambda: ["exact_match", "rouge_l", "bleu"],
        max_length=3,
        description="exact_match (after trimming), rouge_l (F1, rouge-score), bleu (sacrebleu corpus BLEU)",
    )
    max_items: int = Field(100, ge=1, le=2000, description="Held-out rows evaluated (the first ones)")
    max_tokens: int = Field(128, ge=1, le=4096, description="Tokens generated per answer (greedy)")
    judge_deployment: uuid.UUID | None = Field(None, description="A deployment that grades each answer")
    rubric: Annotated[str, StringConstraints(max_length=4000)] | None = Field(
        None, description="What the judge grades against; default: correctness and helpfulness vs the reference"
    )


class EvaluationStatus(StrEnum):
    waiting = "waiting"  # for the run to succeed
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class ExperimentEvaluation(SQLModel, table=True):
    """One experiment's evaluation: the spec, and the results once an inference worker has run it."""

    __tablename__ = "experiment_evaluation"

    experiment_id: uuid.UUID = Field(foreign_key="experiment.id", primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: EvaluationStatus = EvaluationStatus.waiting
    results: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class EvaluationPublic(SQLModel):
    experiment_id: uuid.UUID
    spec: EvalSpec
    status: EvaluationStatus
    results: dict[str, Any] | None = Field(
        None, description="metrics (mean over items), items evaluated, judge scores, and a few examples"
    )
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class ComparedRun(SQLModel):
    id: uuid.UUID
    name: str
    status: str
    final_metrics: dict[str, Any]
    evaluation: dict[str, Any] | None = Field(None, description="Evaluation metrics, when it has run")


class Comparison(SQLModel):
    runs: list[ComparedRun]
    metrics: list[str] = Field(description="Every metric name any run logged")
    steps: list[int] = Field(description="The union of logged steps, ascending")
    curves: dict[str, dict[str, list[float | None]]] = Field(
        description="curves[metric][run id] = values aligned on `steps` (null where that run logged none)"
    )
