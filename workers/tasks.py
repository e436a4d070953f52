"""Celery tasks: thin shells that take ids (or, for inference, the request itself). They parse the message
into its contract and hand it to plain modules that are tested without a broker."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.core.celery_app import celery_app
from app.core.contracts.inference import GenerateMessage, ScoreMessage
from app.core.contracts.training import TrainMessage
from app.core.queues import (
    DATASET_REPORT_TASK,
    EVALUATE_TASK,
    GENERATE_TASK,
    INFERENCE_QUEUE,
    PING_TASK,
    SCORE_TASK,
    TRAIN_TASK,
)

log = logging.getLogger(__name__)


@celery_app.task(name=TRAIN_TASK)
def train(experiment_id: str, attempt: int) -> str:
    """Run attempt ``attempt`` of an experiment, unless another delivery already claimed it."""
    from workers.training.supervisor import run_training

    message = TrainMessage.model_validate({"experiment_id": experiment_id, "attempt": attempt})
    return run_training(message, worker=train.request.hostname or "?")


@celery_app.task(name=DATASET_REPORT_TASK)
def dataset_report(report_id: str) -> str:
    """Compute a dataset report the API found too large to compute in a request."""
    import uuid

    from workers.reports import run_dataset_report

    return run_dataset_report(uuid.UUID(report_id))


@celery_app.task(name=EVALUATE_TASK, acks_late=False)
def evaluate(experiment_id: str) -> str:
    """Grade a succeeded run on its held-out rows, on this inference worker's engine."""
    import uuid

    from workers.evaluation import run_evaluation

    return run_evaluation(uuid.UUID(experiment_id), worker=evaluate.request.hostname or "?")


@celery_app.task(name=PING_TASK)
def ping() -> str:
    """Liveness probe for any queue (`studio worker` health checks, tests)."""
    return "pong"


# Inference: acks_late off. A request whose worker died has already been answered with an error, so it
# must not be redelivered and run again for nobody.
@celery_app.task(name=GENERATE_TASK, acks_late=False)
def generate(request: dict[str, Any]) -> None:
    """One completion on this worker's engine; replies go back through the reply channel."""
    from workers.serving.generate import run_generate

    run_generate(GenerateMessage.model_validate(request), worker=generate.request.hostname or "?")


@celery_app.task(name=SCORE_TASK, acks_late=False)
def score(request: dict[str, Any]) -> None:
    """Eval loss of completions given prompts (A/B tests)."""
    from workers.serving.generate import run_score

    run_score(ScoreMessage.model_validate(request), worker=score.request.hostname or "?")


@worker_ready.connect
def _start_serving(sender: Any, **_: Any) -> None:
    """An inference worker reports itself (and its stats) from the start, before its first request."""
    if INFERENCE_QUEUE in {q.name for q in sender.task_consumer.queues}:
        from app.core.config import get_settings
        from workers.serving.manager import get_manager

        get_manager(get_settings(), sender.hostname)


@worker_shutting_down.connect
def _hand_off_training(sender: Any, **_: Any) -> None:
    """Warm shutdown (SIGTERM to the worker: an eviction, a deploy): the supervisors of this worker's
    running jobs checkpoint and hand them back at once, instead of training on until SIGKILL and then
    waiting out the stale window. Runs in the main process; the supervisor runs in a pool process and
    learns it from the row at its next heartbeat."""
    from workers import jobs

    try:
        if asked := jobs.request_handoff(str(sender)):
            log.warning("worker %s shutting down: handing off %d running job(s)", sender, asked)
    except Exception:  # the database is away: the reaper requeues the job after the stale window instead
        log.exception("could not ask for a handoff of %s's jobs", sender)


@worker_shutdown.connect
def _stop_serving(**_: Any) -> None:
    manager = sys.modules.get("workers.serving.manager")  # only where serving ran: no torch import here
    if manager is not None:
        manager.shutdown_manager()
