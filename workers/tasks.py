"""Celery tasks: thin shells that take ids. The logic lives in plain modules tested without a broker."""

from __future__ import annotations

import sys
import uuid
from typing import Any

from celery.signals import worker_ready, worker_shutdown

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


# Inference: acks_late off. A request whose worker died has already been answered with an error, so it
# must not be redelivered and run again for nobody.
@celery_app.task(name="studio.generate", acks_late=False)
def generate(request: dict[str, Any]) -> None:
    """One completion on this worker's engine; replies go back through the reply channel."""
    from workers.serving.generate import run_generate

    run_generate(request, worker=generate.request.hostname or "?")


@celery_app.task(name="studio.score", acks_late=False)
def score(request: dict[str, Any]) -> None:
    """Eval loss of completions given prompts (A/B tests)."""
    from workers.serving.generate import run_score

    run_score(request, worker=score.request.hostname or "?")


@worker_ready.connect
def _start_serving(sender: Any, **_: Any) -> None:
    """An inference worker reports itself (and its stats) from the start, before its first request."""
    if "inference" in {q.name for q in sender.task_consumer.queues}:
        from app.core.config import get_settings
        from workers.serving.manager import get_manager

        get_manager(get_settings(), sender.hostname)


@worker_shutdown.connect
def _stop_serving(**_: Any) -> None:
    manager = sys.modules.get("workers.serving.manager")  # only where serving ran: no torch import here
    if manager is not None:
        manager.shutdown_manager()
