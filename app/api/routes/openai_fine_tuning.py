"""OpenAI's fine-tuning jobs API: create, list, retrieve, cancel, pause, resume, events, checkpoints.

A job is one of the team's experiments (see app/services/fine_tuning.py): it runs on the same queue,
supervision, checkpoints and stop/resume as any other, and is listed by /api/experiments too. Once it
succeeds, its `fine_tuned_model` answers at /v1/chat/completions (deployed on first use), and so does each
stored checkpoint's `fine_tuned_model_checkpoint`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from app.api.deps import SessionDep, SettingsDep, StorageDep, Trainer, Viewer
from app.api.limits import reject_unstorable_text
from app.api.responses import OPENAI_ERRORS
from app.core import notify
from app.models import Experiment
from app.models.fine_tuning import FineTuningJobCreate
from app.services import experiments, fine_tuning
from app.services.errors import Conflict
from app.services.relay import wake_relay

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["openai"],
    responses=OPENAI_ERRORS,
    dependencies=[Depends(reject_unstorable_text)],
)
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=100)]


@router.post("")
def create_job(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, principal: Trainer, body: FineTuningJobCreate
) -> dict[str, Any]:
    """Queue a fine-tuning run of `model` on `training_file` (a file id from /v1/files)."""
    experiment = fine_tuning.create_job(session=session, settings=settings, storage=storage, actor=principal, body=body)
    _published(experiment)
    return fine_tuning.job_object(session, experiment)


@router.get("")
def list_jobs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: Viewer,
    after: Cursor = None,
    limit: Limit = 20,
) -> dict[str, Any]:
    """The team's jobs (every experiment), newest first; `metadata[key]=value` query parameters filter."""
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    rows, has_more = fine_tuning.list_jobs(
        session=session, team_id=principal.team_id, after=after, limit=limit, metadata=metadata
    )
    return {
        "object": "list",
        "data": [fine_tuning.job_object(session, e) for e in rows],
        "has_more": has_more,
    }


@router.get("/{job_id}")
def retrieve_job(session: SessionDep, settings: SettingsDep, principal: Viewer, job_id: str) -> dict[str, Any]:
    return fine_tuning.job_object(session, fine_tuning.owned_job(session, principal.team_id, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, settings: SettingsDep, principal: Trainer, job_id: str) -> dict[str, Any]:
    """A queued or paused job is cancelled at once; a running one when its worker sees the flag."""
    experiment = fine_tuning.owned_job(session, principal.team_id, job_id)
    if experiment.status.terminal:
        raise Conflict(f"the job is already {fine_tuning.STATUSES[experiment.status]}", field="fine_tuning_job_id")
    experiment = experiments.stop_experiment(session=session, actor=principal, experiment=experiment)
    _published(experiment)
    return fine_tuning.job_object(session, experiment)


@router.post("/{job_id}/pause")
def pause_job(session: SessionDep, settings: SettingsDep, principal: Trainer, job_id: str) -> dict[str, Any]:
    """The run checkpoints at the end of its step and frees its GPU; `resume` continues from there."""
    experiment = fine_tuning.owned_job(session, principal.team_id, job_id)
    experiment = experiments.pause_experiment(session=session, actor=principal, experiment=experiment)
    _published(experiment)
    return fine_tuning.job_object(session, experiment)


@router.post("/{job_id}/resume")
def resume_job(session: SessionDep, settings: SettingsDep, principal: Trainer, job_id: str) -> dict[str, Any]:
    """Queue a paused job again; it continues from the checkpoint written when it paused."""
    experiment = fine_tuning.owned_job(session, principal.team_id, job_id)
    if experiment.status.value != "paused":
        raise Conflict(
            f"the job is {fine_tuning.STATUSES[experiment.status]}; only a paused job resumes",
            field="fine_tuning_job_id",
        )
    experiment = experiments.start_experiment(
        session=session, settings=settings, actor=principal, experiment=experiment
    )
    _published(experiment)
    return fine_tuning.job_object(session, experiment)


@router.get("/{job_id}/events")
def list_events(
    session: SessionDep, principal: Viewer, job_id: str, after: Cursor = None, limit: Limit = 20
) -> dict[str, Any]:
    """Status changes, metrics, checkpoints, newest first; `after` is the last event id of the previous page."""
    experiment = fine_tuning.owned_job(session, principal.team_id, job_id)
    data, has_more = fine_tuning.events_page(session, experiment, after, limit)
    return {"object": "list", "data": data, "has_more": has_more}


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    session: SessionDep, storage: StorageDep, principal: Viewer, job_id: str, after: Cursor = None, limit: Limit = 10
) -> dict[str, Any]:
    """The stored checkpoints, newest first, each with its metrics and the model name that serves it."""
    experiment = fine_tuning.owned_job(session, principal.team_id, job_id)
    data, has_more = fine_tuning.checkpoints_page(session, storage, experiment, after, limit)
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _published(experiment: Experiment) -> None:
    wake_relay()  # send its queued message now, not at the relay's next poll
    notify.publish(experiment.id, experiment.team_id)
