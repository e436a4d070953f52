"""Job ownership on the worker side: claim by attempt number, then fence every write on it.

A message says "run attempt N of experiment X". Only one worker can move the row from
``queued @ N-1`` to ``running @ N``; a second delivery of the same message finds the row already
moved and does nothing. Every later write checks ``attempt == N`` so a worker that lost the job
(requeued after a missed heartbeat, or stopped) cannot overwrite the new owner's state.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlmodel import Session, col, select, update

from app.core import notify
from app.core.contracts.events import StatusEvent
from app.core.db import is_postgres, session_scope
from app.core.evaluation_queue import queue_evaluation
from app.core.event_log import Fenced, record_event, record_status
from app.core.job_queue import count_loss, queue_next_attempt
from app.models import Experiment, ExperimentStatus, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")


def _owned_row(session: Session, experiment_id: uuid.UUID, attempt: int) -> Experiment | None:
    """The row, locked (Postgres), while this attempt still owns the running job; else None."""
    query = select(Experiment).where(
        col(Experiment.id) == experiment_id,
        col(Experiment.attempt) == attempt,
        col(Experiment.status) == ExperimentStatus.running,
    )
    return session.exec(query.with_for_update() if is_postgres(session) else query).first()


def _owned(experiment_id: uuid.UUID, attempt: int) -> Any:
    return update(Experiment).where(
        col(Experiment.id) == experiment_id,
        col(Experiment.attempt) == attempt,
        col(Experiment.status) == ExperimentStatus.running,
    )


def requested_gpus(experiment_id: uuid.UUID) -> int:
    """The GPUs (processes) the job asks for; 1 if it no longer exists (the claim then skips it)."""
    with session_scope() as session:
        experiment = session.get(Experiment, experiment_id)
        return experiment.gpus if experiment is not None else 1


def claim(experiment_id: uuid.UUID, attempt: int, worker: str) -> Experiment | None:
    """Take the job for this attempt, or return None if someone else has or it is no longer queued."""
    with session_scope() as session:
        now = utcnow()
        result = session.exec(  # type: ignore[call-overload]
            update(Experiment)
            .where(
                col(Experiment.id) == experiment_id,
                col(Experiment.status) == ExperimentStatus.queued,
                col(Experiment.attempt) == attempt - 1,
            )
            .values(
                status=ExperimentStatus.running,
                attempt=attempt,
                worker=worker,
                heartbeat_at=now,
                started_at=now,
                stop_requested=False,
            )
        )
        if result.rowcount != 1:
            session.rollback()
            return None
        event = StatusEvent(status=ExperimentStatus.running.value, attempt=attempt, worker=worker)
        record_status(session, experiment_id, event, fenced=True)
        session.commit()
        experiment = session.get(Experiment, experiment_id)
    _notify(experiment)
    return experiment


@dataclass(frozen=True)
class Orders:
    """What the job's row asks of its supervisor at a heartbeat."""

    stop: bool  # the user asked to stop: end the run (cancelled)
    handoff: bool  # this worker is shutting down: checkpoint and give the job back
    pause: bool  # the user paused the job: checkpoint and leave it paused


def heartbeat(experiment_id: uuid.UUID, attempt: int, pid: int | None = None) -> Orders:
    """Refresh the heartbeat and read the orders. Raises Fenced if this attempt no longer owns the job."""
    with session_scope() as session:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if pid is not None:
            values["pid"] = pid
        row = session.exec(  # type: ignore[call-overload]
            _owned(experiment_id, attempt)
            .values(**values)
            .returning(
                col(Experiment.stop_requested), col(Experiment.handoff_requested), col(Experiment.pause_requested)
            )
        ).one_or_none()
        session.commit()
    if row is None:
        raise Fenced(f"experiment {experiment_id} attempt {attempt} lost ownership")
    return Orders(stop=bool(row[0]), handoff=bool(row[1]), pause=bool(row[2]))


def request_handoff(worker: str) -> int:
    """The worker is shutting down: ask the supervisors of its running jobs to checkpoint and hand them
    back (they see it at their next heartbeat). Returns how many jobs were asked."""
    with session_scope() as session:
        result = session.exec(  # type: ignore[call-overload]
            update(Experiment)
            .where(col(Experiment.worker) == worker, col(Experiment.status) == ExperimentStatus.running)
            .values(handoff_requested=True)
        )
        session.commit()
        return int(result.rowcount)


def hand_off(experiment_id: uuid.UUID, attempt: int, reason: str) -> bool:
    """Give the owned job back to the queue as the next attempt, at once (no backoff, not counted as a
    worker loss): it resumes from its last stored checkpoint. False if this attempt no longer owns it."""
    with session_scope() as session:
        experiment = _owned_row(session, experiment_id, attempt)
        if experiment is None:
            return False
        queue_next_attempt(session, experiment, reason=reason)
        session.commit()
        team_id = experiment.team_id
    notify.publish(experiment_id, team_id)
    return True


def lose(experiment_id: uuid.UUID, attempt: int, *, what: str, max_attempts: int, backoff_s: float) -> str | None:
    """The owned attempt died without a word (the trainer was SIGKILLed: the OOM killer, an operator): count a
    loss against the job's budget and queue the next attempt after a backoff, or fail it. Returns the new
    status, or None if this attempt no longer owns the job."""
    with session_scope() as session:
        experiment = _owned_row(session, experiment_id, attempt)
        if experiment is None:
            return None
        status = count_loss(session, experiment, what=what, max_attempts=max_attempts, backoff_s=backoff_s)
        session.commit()
        team_id = experiment.team_id
    notify.publish(experiment_id, team_id)
    return status.value


def with_db_retries(what: str, operation: Callable[[], T], budget_s: float) -> T:
    """Run ``operation``, retrying database errors with backoff for up to ``budget_s``: a blip must not kill
    a run. ``Fenced`` (lost ownership) is not an error to retry; it ends the attempt."""
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return operation()
        except (OperationalError, InterfaceError, DisconnectionError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database error, retrying in %.1f s: %s", what, delay, str(exc).splitlines()[0])
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def add_events(experiment_id: uuid.UUID, attempt: int, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Persist trainer events in one transaction, then tell watchers."""
    if not events:
        return
    with session_scope() as session:
        for type_, data in events:
            record_event(session, experiment_id, type_, data, attempt=attempt)
        session.commit()
        team_id = session.get(Experiment, experiment_id).team_id  # type: ignore[union-attr]
    notify.publish(experiment_id, team_id)


def record_libraries(experiment_id: uuid.UUID, attempt: int, versions: dict[str, str]) -> bool:
    """Add the training stack of the worker running this attempt to the run's lineage."""
    with session_scope() as session:
        experiment = _owned_row(session, experiment_id, attempt)
        if experiment is None:
            return False
        experiment.lineage = {**(experiment.lineage or {}), "libraries": versions, "worker": experiment.worker}
        session.add(experiment)
        session.commit()
        return True


def finish(
    experiment_id: uuid.UUID,
    attempt: int,
    status: ExperimentStatus,
    *,
    error: str | None = None,
    log_tail: str | None = None,
    final_metrics: dict[str, Any] | None = None,
) -> bool:
    """Move the owned job to a terminal status (or paused); False if this attempt no longer owns it."""
    with session_scope() as session:
        values: dict[str, Any] = {
            "status": status,
            "finished_at": utcnow() if status.terminal else None,
            "pid": None,
            "error": error,
            "log_tail": log_tail,
        }
        if final_metrics is not None:
            values["final_metrics"] = final_metrics
        try:
            event = StatusEvent(status=status.value, attempt=attempt, error=error)
            record_status(session, experiment_id, event, fenced=True)
        except Fenced:
            session.rollback()
            return False
        session.exec(_owned(experiment_id, attempt).values(**values))  # type: ignore[call-overload]
        if status is ExperimentStatus.succeeded:
            queue_evaluation(session, experiment_id)  # with the status: a run never succeeds unevaluated
        session.commit()
        experiment = session.get(Experiment, experiment_id)
    _notify(experiment)
    return True


def _notify(experiment: Experiment | None) -> None:
    if experiment is not None:
        notify.publish(experiment.id, experiment.team_id)
