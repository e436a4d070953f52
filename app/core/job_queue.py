"""Queue the next attempt of a training job: the one way a job (re)enters the queue, used by the API
(create, start, requeue of a lost worker, resend of a lost message) and by workers (handoff).

Status, status event and the Celery wake-up (an outbox row holding a `TrainMessage`) are written in
the caller's transaction, so the message leaves only if the change commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlmodel import Session

from app.core.contracts.training import TrainMessage
from app.core.event_log import status_event
from app.core.outbox import enqueue
from app.core.queues import TRAIN_TASK
from app.models import Experiment, ExperimentStatus, utcnow


def queue_next_attempt(
    session: Session, experiment: Experiment, *, reason: str | None = None, delay_s: float = 0.0
) -> None:
    """Mark the job queued and send "run attempt N+1", not before ``delay_s`` from now."""
    now = utcnow()
    experiment.status = ExperimentStatus.queued
    experiment.stop_requested = False
    experiment.handoff_requested = False
    experiment.pause_requested = False
    experiment.worker = None
    experiment.pid = None
    experiment.queued_at = now
    experiment.queue_resends = 0
    session.add(experiment)
    session.flush()
    status_event(session, experiment, reason=reason)
    send_attempt_message(session, experiment, not_before=now + timedelta(seconds=delay_s) if delay_s else None)


def send_attempt_message(session: Session, experiment: Experiment, *, not_before: datetime | None = None) -> None:
    """The wake-up for the queued attempt (sent again as is when a message was lost: claims make
    duplicates harmless)."""
    message = TrainMessage(experiment_id=experiment.id, attempt=experiment.attempt + 1)
    enqueue(
        session=session,
        task_name=TRAIN_TASK,
        queue=experiment.queue,
        payload=message.kwargs(),
        not_before=not_before,
    )


def end_job(
    session: Session, experiment: Experiment, status: ExperimentStatus, *, reason: str, error: str | None = None
) -> None:
    """Move the job to a terminal status with its status event, in the caller's transaction."""
    experiment.status = status
    experiment.finished_at = utcnow()
    if error is not None:
        experiment.error = error
    session.add(experiment)
    session.flush()
    status_event(session, experiment, reason=reason)


MAX_BACKOFF_S = 600.0


def count_loss(
    session: Session, experiment: Experiment, *, what: str, max_attempts: int, backoff_s: float
) -> ExperimentStatus:
    """An attempt died without a word (its worker went silent, its trainer was SIGKILLed: the OOM killer):
    queue the next one after a backoff that doubles per loss, or fail the job once it has lost
    ``max_attempts``, so a job that takes its worker down does not loop. Returns the new status."""
    experiment.worker_losses += 1
    if experiment.worker_losses >= max_attempts:
        error = (
            f"lost {experiment.worker_losses} times (last: {what}); giving up after training.max_attempts. "
            "Fix the cause, then start the experiment again"
        )
        end_job(session, experiment, ExperimentStatus.failed, reason="too many lost attempts", error=error)
        return ExperimentStatus.failed
    delay = min(backoff_s * 2 ** (experiment.worker_losses - 1), MAX_BACKOFF_S)
    reason = f"{what} ({experiment.worker_losses} of {max_attempts}); requeued"
    queue_next_attempt(session, experiment, reason=reason, delay_s=delay)
    return ExperimentStatus.queued
