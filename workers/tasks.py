"""Celery tasks: thin shells that take ids (or, for inference, the request itself). They parse the message
into its contract and hand it to plain modules that are tested without a broker."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown, worker_shutting_down

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
    worker_queue,
)

log = logging.getLogger(__name__)
GPU_RETRY_S = 10  # a job too large for the worker that got its message is offered again this much later


@celery_app.task(name=TRAIN_TASK)
def train(experiment_id: str, attempt: int) -> str:
    """Run attempt ``attempt`` of an experiment, unless another delivery already claimed it."""
    from workers import jobs
    from workers.training.registry import gpu_slots
    from workers.training.supervisor import run_training

    message = TrainMessage.model_validate({"experiment_id": experiment_id, "attempt": attempt})
    wanted, have = jobs.requested_gpus(message.experiment_id), gpu_slots()[1]
    if wanted > have:  # another worker of this class may have enough: back to the queue, not claimed
        log.info(
            "experiment %s asks for %d GPUs; this worker has %d: leaving it to another", experiment_id, wanted, have
        )
        raise train.retry(countdown=GPU_RETRY_S, max_retries=None)
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


@celeryd_after_setup.connect
def _consume_own_inference_queue(sender: str, instance: Any, **_: Any) -> None:
    """An inference worker also consumes a queue of its own: the API sends it the requests for the base
    models placed on it (`app.services.placement`), so requests reach the worker that holds their model."""
    queues = instance.app.amqp.queues
    if INFERENCE_QUEUE in queues.consume_from:
        queues.select_add(worker_queue(sender))


_registration: Any = None


@worker_ready.connect
def _start_serving(sender: Any, **_: Any) -> None:
    """An inference worker reports itself (and its stats) from the start, before its first request; a
    training worker registers its queues and GPUs (`workers.training.registry`)."""
    from app.core.config import get_settings

    queues = {q.name for q in sender.task_consumer.queues}
    if INFERENCE_QUEUE in queues:
        from workers.serving.manager import get_manager

        get_manager(get_settings(), sender.hostname)
    training = sorted(q for q in queues if q.startswith("train."))
    if training:
        from workers.training.registry import TrainingRegistration

        global _registration
        _registration = TrainingRegistration(sender.hostname, training, get_settings().training.heartbeat_interval_s)
        try:
            _registration.start()
        except Exception:  # the database is away: jobs still run; the registry catches up at the next beat
            log.exception("registering training worker %s failed", sender.hostname)


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
    if _registration is not None:
        try:
            _registration.close()
        except Exception:
            log.exception("deregistering the training worker failed")
    manager = sys.modules.get("workers.serving.manager")  # only where serving ran: no torch import here
    if manager is not None:
        manager.shutdown_manager()
