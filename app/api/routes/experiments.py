"""Experiments: submit, list, read, start again, pause, stop, metrics, live events (SSE), artifacts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import Page, SessionDep, SettingsDep, StorageDep, Trainer, Viewer, get_owned_or_404
from app.api.idempotency import idempotent
from app.core import notify
from app.core.db import session_scope
from app.core.event_log import events_after
from app.core.layout import artifact_prefix
from app.models import (
    ArtifactPublic,
    ArtifactsPublic,
    EventPublic,
    Experiment,
    ExperimentCreate,
    ExperimentPublic,
    ExperimentsPublic,
    ExperimentStatus,
    MetricsPublic,
)
from app.services import experiments as service
from app.services import fleet
from app.services.principal import Principal, still_allowed
from app.services.relay import wake_relay

router = APIRouter(prefix="/experiments", tags=["experiments"])
MEMBERSHIP_RECHECK_S = 10.0


@router.post("/", response_model=ExperimentPublic, status_code=201)
@idempotent
def create_experiment(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, principal: Trainer, body: ExperimentCreate
) -> ExperimentPublic:
    """Submit a fine-tuning experiment; it is queued at once (429 when the team is at its quota)."""
    experiment = service.create_experiment(
        session=session, settings=settings, storage=storage, actor=principal, body=body
    )
    _after_commit(experiment)
    return fleet.public(session, settings, [experiment])[0]


@router.get("/", response_model=ExperimentsPublic)
def list_experiments(
    session: SessionDep,
    settings: SettingsDep,
    principal: Viewer,
    page: Page,
    status: ExperimentStatus | None = None,
) -> ExperimentsPublic:
    """List the team's experiments, newest first, optionally by status."""
    rows, count = service.list_experiments(
        session=session, team_id=principal.team_id, status=status, skip=page.skip, limit=page.limit
    )
    return ExperimentsPublic(data=fleet.public(session, settings, rows), count=count)


@router.get("/{experiment_id}", response_model=ExperimentPublic)
def read_experiment(
    session: SessionDep, settings: SettingsDep, principal: Viewer, experiment_id: uuid.UUID
) -> ExperimentPublic:
    """One experiment: status, attempt, hyperparameters, error, final metrics; a queued one that no live
    worker can take says why (`waiting_reason`)."""
    return fleet.public(session, settings, [_get(session, principal.team_id, experiment_id)])[0]


@router.post("/{experiment_id}/start", response_model=ExperimentPublic)
def start_experiment(
    session: SessionDep, settings: SettingsDep, principal: Trainer, experiment_id: uuid.UUID
) -> ExperimentPublic:
    """Queue a created, paused, failed or cancelled experiment; it resumes from its last checkpoint."""
    experiment = service.start_experiment(
        session=session, settings=settings, actor=principal, experiment=_get(session, principal.team_id, experiment_id)
    )
    _after_commit(experiment)
    return ExperimentPublic.model_validate(experiment)


@router.post("/{experiment_id}/stop", response_model=ExperimentPublic)
def stop_experiment(session: SessionDep, principal: Trainer, experiment_id: uuid.UUID) -> ExperimentPublic:
    """Cancel: a queued job at once, a running one as soon as its worker sees the flag."""
    experiment = service.stop_experiment(
        session=session, actor=principal, experiment=_get(session, principal.team_id, experiment_id)
    )
    _after_commit(experiment)
    return ExperimentPublic.model_validate(experiment)


@router.post("/{experiment_id}/pause", response_model=ExperimentPublic)
def pause_experiment(session: SessionDep, principal: Trainer, experiment_id: uuid.UUID) -> ExperimentPublic:
    """Pause: a running job checkpoints at the end of its step and frees its worker; /start resumes it."""
    experiment = service.pause_experiment(
        session=session, actor=principal, experiment=_get(session, principal.team_id, experiment_id)
    )
    _after_commit(experiment)
    return ExperimentPublic.model_validate(experiment)


@router.get("/{experiment_id}/metrics", response_model=MetricsPublic)
def read_metrics(
    session: SessionDep,
    principal: Viewer,
    experiment_id: uuid.UUID,
    after: Annotated[int, Query(ge=0, description="Only events with seq > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricsPublic:
    """Logged training and eval metrics in order (loss, learning rate, grad norm, tokens/s, ...)."""
    _get(session, principal.team_id, experiment_id)
    rows = events_after(session=session, experiment_id=experiment_id, after_seq=after, type_="metrics", limit=limit)
    return MetricsPublic(data=[EventPublic.model_validate(r) for r in rows], count=len(rows))


@router.get("/{experiment_id}/events")
async def stream_events(
    session: SessionDep,
    principal: Viewer,
    experiment_id: uuid.UUID,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
    after: Annotated[int, Query(ge=0)] = 0,
) -> EventSourceResponse:
    """Server-sent events: every status change and metric, resumable with Last-Event-ID."""
    await run_in_threadpool(_get, session, principal.team_id, experiment_id)
    await run_in_threadpool(session.close)  # the stream may last hours; it reads with short sessions of its own
    start = last_event_id if last_event_id is not None else after
    return EventSourceResponse(_event_stream(principal, experiment_id, start), ping=10)


async def _event_stream(
    principal: Principal, experiment_id: uuid.UUID, after_seq: int
) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(retry=notify.retry_ms())  # after a cut, the client reconnects (with Last-Event-ID) soon
    recheck_at = time.monotonic() + MEMBERSHIP_RECHECK_S
    async with notify.ChangeWaiter(notify.experiment_channel(experiment_id)) as waiter:
        while True:
            if time.monotonic() >= recheck_at:  # removed from the team, or key revoked: the stream ends
                recheck_at = time.monotonic() + MEMBERSHIP_RECHECK_S
                if not await run_in_threadpool(still_allowed, principal):
                    return
            events, status = await run_in_threadpool(_read_new, experiment_id, after_seq)
            for event in events:
                after_seq = event.seq
                payload = {**event.data, "seq": event.seq, "created_at": event.created_at.isoformat()}
                yield ServerSentEvent(data=json.dumps(payload), event=event.type, id=str(event.seq))
            if not events:
                if status.terminal:  # the terminal status event is always the last one written
                    return
                await waiter.wait()


def _read_new(experiment_id: uuid.UUID, after_seq: int) -> tuple[list[EventPublic], ExperimentStatus]:
    with session_scope() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        rows = events_after(session=session, experiment_id=experiment_id, after_seq=after_seq, limit=500)
        return [EventPublic.model_validate(r) for r in rows], experiment.status


@router.get("/{experiment_id}/artifacts", response_model=ArtifactsPublic)
def list_artifacts(
    session: SessionDep, storage: StorageDep, principal: Viewer, experiment_id: uuid.UUID
) -> ArtifactsPublic:
    """Files of a finished run: adapter, tokenizer, config, metrics, model card, log."""
    _get(session, principal.team_id, experiment_id)
    prefix = artifact_prefix(experiment_id)
    files = [ArtifactPublic(path=o.key[len(prefix) + 1 :], size_bytes=o.size_bytes) for o in storage.list(prefix)]
    return ArtifactsPublic(data=files, count=len(files))


@router.get("/{experiment_id}/artifacts/{path:path}")
def download_artifact(
    session: SessionDep, storage: StorageDep, principal: Viewer, experiment_id: uuid.UUID, path: str
) -> StreamingResponse:
    """Download one artifact file."""
    _get(session, principal.team_id, experiment_id)
    prefix = artifact_prefix(experiment_id)
    known = {o.key[len(prefix) + 1 :] for o in storage.list(prefix)}
    if path not in known:  # only names we listed, so a crafted path cannot reach other keys
        raise HTTPException(404, f"no artifact {path!r}")
    stream = storage.open(f"{prefix}/{path}")

    def chunks() -> Iterator[bytes]:
        with stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    filename = path.rsplit("/", 1)[-1]
    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete("/{experiment_id}", status_code=204)
def delete_experiment(session: SessionDep, storage: StorageDep, principal: Trainer, experiment_id: uuid.UUID) -> None:
    """Delete a finished (or never started) experiment with its metrics, checkpoints and artifacts."""
    experiment = _get(session, principal.team_id, experiment_id)
    service.delete_experiment(session=session, storage=storage, actor=principal, experiment=experiment)
    notify.publish(experiment_id, principal.team_id)


def _get(session: SessionDep, team_id: uuid.UUID, experiment_id: uuid.UUID) -> Experiment:
    return get_owned_or_404(session=session, model=Experiment, team_id=team_id, id=experiment_id, what="experiment")


def _after_commit(experiment: Experiment) -> None:
    wake_relay()
    notify.publish(experiment.id, experiment.team_id)
