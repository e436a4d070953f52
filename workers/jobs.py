"""Job ownership on the worker side: claim by attempt number, then fence every write on it.

A message says "run attempt N of experiment X". Only one worker can move the row from
``queued @ N-1`` to ``running @ N``; a second delivery of the same message finds the row already
moved and does nothing. Every later write checks ``attempt == N`` so a worker that lost the job
(requeued after a missed heartbeat, or stopped) cannot overwrite the new owner's state.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import col, update

from app.core import notify
from app.core.db import session_scope
from app.models import Experiment, ExperimentStatus, utcnow
from app.services.events import Fenced, record_event


def _owned(experiment_id: uuid.UUID, attempt: int) -> Any:
    return update(Experiment).where(
        col(Experiment.id) == experiment_id,
        col(Experiment.attempt) == attempt,
        col(Experiment.status) == ExperimentStatus.running,
    )


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
            )  # fmt: skip
        )
        if result.rowcount != 1:
            session.rollback()
            return None
        record_event(session, experiment_id, "status",
                     {"status": "running", "attempt": attempt, "worker": worker}, attempt=attempt)  # fmt: skip
        session.commit()
        experiment = session.get(Experiment, experiment_id)
    _notify(experiment)
    return experiment


def heartbeat(experiment_id: uuid.UUID, attempt: int, pid: int | None = None) -> bool:
    """Refresh the heartbeat; returns whether a stop was requested. Raises Fenced if not owner."""
    with session_scope() as session:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if pid is not None:
            values["pid"] = pid
        stop = session.exec(  # type: ignore[call-overload]
            _owned(experiment_id, attempt).values(**values).returning(col(Experiment.stop_requested))
        ).scalar_one_or_none()
        session.commit()
    if stop is None:
        raise Fenced(f"experiment {experiment_id} attempt {attempt} lost ownership")
    return bool(stop)


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


def finish(
    experiment_id: uuid.UUID,
    attempt: int,
    status: ExperimentStatus,
    *,
    error: str | None = None,
    log_tail: str | None = None,
    final_metrics: dict[str, Any] | None = None,
) -> bool:
    """Move the owned job to a terminal status; False if this attempt no longer owns it."""
    with session_scope() as session:
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "pid": None,
                                  "error": error, "log_tail": log_tail}  # fmt: skip
        if final_metrics is not None:
            values["final_metrics"] = final_metrics
        try:
            record_event(session, experiment_id, "status",
                         {"status": status.value, "attempt": attempt,
                          **({"error": error} if error else {})}, attempt=attempt)  # fmt: skip
        except Fenced:
            session.rollback()
            return False
        session.exec(_owned(experiment_id, attempt).values(**values))  # type: ignore[call-overload]
        session.commit()
        experiment = session.get(Experiment, experiment_id)
    _notify(experiment)
    return True


def _notify(experiment: Experiment | None) -> None:
    if experiment is not None:
        notify.publish(experiment.id, experiment.team_id)
