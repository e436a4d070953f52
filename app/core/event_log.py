"""The per-experiment event log: status changes, metrics, checkpoints, in gap-free ``seq`` order.

Postgres (or SQLite) is the truth; Redis only says "something new" (see app.core.notify).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import Session, col, func, select, update

from app.core.contracts.events import StatusEvent
from app.models import Experiment, ExperimentEvent, ExperimentStatus


class Fenced(RuntimeError):
    """The job is no longer owned by this attempt (stopped, requeued, or claimed elsewhere)."""


def record_event(
    session: Session,
    experiment_id: uuid.UUID,
    type_: str,
    data: dict[str, Any],
    *,
    attempt: int | None = None,
) -> ExperimentEvent:
    """Append an event in the caller's transaction. With ``attempt``, only the owner may write."""
    stmt = update(Experiment).where(col(Experiment.id) == experiment_id)
    if attempt is not None:
        stmt = stmt.where(col(Experiment.attempt) == attempt, col(Experiment.status) == ExperimentStatus.running)
    # The row update both allocates the next seq and serialises concurrent writers.
    seq = session.exec(  # type: ignore[call-overload]
        stmt.values(event_seq=col(Experiment.event_seq) + 1).returning(col(Experiment.event_seq))
    ).scalar_one_or_none()
    if seq is None:
        raise Fenced(f"experiment {experiment_id} is not owned by attempt {attempt}")
    event = ExperimentEvent(experiment_id=experiment_id, seq=seq, type=type_, data=data)
    session.add(event)
    return event


def record_status(session: Session, experiment_id: uuid.UUID, event: StatusEvent, *, fenced: bool) -> ExperimentEvent:
    """Append a status change; ``fenced``: only if ``event.attempt`` still owns the running job."""
    return record_event(session, experiment_id, "status", event.data(), attempt=event.attempt if fenced else None)


def status_event(session: Session, experiment: Experiment, *, reason: str | None = None) -> ExperimentEvent:
    """The row's current status, as the API changed it."""
    event = StatusEvent(status=experiment.status.value, attempt=experiment.attempt, reason=reason)
    return record_status(session, experiment.id, event, fenced=False)


def events_after(
    session: Session,
    experiment_id: uuid.UUID,
    after_seq: int,
    *,
    type_: str | None = None,
    limit: int = 1000,
) -> list[ExperimentEvent]:
    query = select(ExperimentEvent).where(
        ExperimentEvent.experiment_id == experiment_id, col(ExperimentEvent.seq) > after_seq
    )
    if type_:
        query = query.where(ExperimentEvent.type == type_)
    return list(session.exec(query.order_by(col(ExperimentEvent.seq)).limit(limit)).all())


def team_status_events(
    session: Session, team_id: uuid.UUID, after_id: int, *, limit: int = 500
) -> list[tuple[ExperimentEvent, str]]:
    """Status changes of a team's experiments with event id > ``after_id``, oldest first, with names."""
    rows = session.exec(
        select(ExperimentEvent, Experiment.name)
        .join(Experiment, col(Experiment.id) == col(ExperimentEvent.experiment_id))
        .where(Experiment.team_id == team_id, ExperimentEvent.type == "status", col(ExperimentEvent.id) > after_id)
        .order_by(col(ExperimentEvent.id))
        .limit(limit)
    ).all()
    return [(event, name) for event, name in rows]


def latest_event_id(session: Session) -> int:
    return session.exec(select(func.max(ExperimentEvent.id))).one() or 0
