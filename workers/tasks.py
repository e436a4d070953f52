"""Celery tasks: thin shells that take ids. The logic lives in plain modules tested without a broker."""

from __future__ import annotations

import uuid

from workers.celery_app import celery_app


@celery_app.task(name="studio.train")
def train(experiment_id: str, attempt: int) -> str:
    """Run attempt ``attempt`` of an experiment, unless another delivery already claimed it."""
    from workers.training.supervisor import run_training

    return run_training(uuid.UUID(experiment_id), attempt, worker=train.request.hostname or "?")


@celery_app.task(name="studio.ping")
def ping() -> str:
    """Liveness probe for any queue (`studio worker` health checks, tests)."""
    return "pong"
