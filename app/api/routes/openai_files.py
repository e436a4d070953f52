"""OpenAI's Files API for fine-tuning data: POST/GET /v1/files, GET /v1/files/{id}[/content], DELETE.

A file is one of the team's datasets (see app/services/fine_tuning.py): an upload here is listed by
/api/datasets, and every dataset is a file here. JSONL in OpenAI's chat (`messages`, with `weight`),
prompt/completion and preference (`input`/`preferred_output`/`non_preferred_output`) formats, validated
row by row; the first bad line is a 400 naming it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, Query, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlmodel import Session, col, select

from app.api.deps import SessionDep, SettingsDep, StorageDep, Trainer, Viewer
from app.api.limits import reject_unstorable_text
from app.api.responses import OPENAI_ERRORS
from app.api.uploads import spooled_upload
from app.models import Dataset, Experiment
from app.services import curation, fine_tuning
from app.services import datasets as datasets_service
from app.services.errors import InvalidRequest
from app.services.paging import keyset_page

router = APIRouter(
    prefix="/v1/files", tags=["openai"], responses=OPENAI_ERRORS, dependencies=[Depends(reject_unstorable_text)]
)


@router.post("")
def create_file(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: Trainer,
    file: UploadFile,
    purpose: Annotated[str, Form(max_length=50)],
) -> dict[str, Any]:
    """Upload fine-tuning data (`purpose` must be `fine-tune`): it becomes a dataset of the team."""
    if purpose != "fine-tune":
        raise InvalidRequest("purpose", "only 'fine-tune' files are accepted here", status_code=400)
    with spooled_upload(file, settings.api.max_upload_bytes) as (path, kind):
        if kind != "jsonl":
            raise InvalidRequest("file", f"must be JSON lines (.jsonl), got {kind}", status_code=400)
        dataset = datasets_service.create_from_file(
            session=session,
            storage=storage,
            actor=principal,
            name=Path(file.filename or "upload.jsonl").name[:200] or "upload.jsonl",
            path=path,
            kind=kind,
            fmt=None,
            eval_fraction=0.0,  # OpenAI evaluates on a validation_file only, never on a share of the training file
            limits=datasets_service.upload_limits(settings.api),
        )
    return fine_tuning.file_object(dataset)


@router.get("")
def list_files(
    session: SessionDep,
    principal: Viewer,
    purpose: Annotated[str | None, Query(max_length=50)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=100)] = None,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> dict[str, Any]:
    """The team's datasets as files (purpose `fine-tune`), paged by `after` (a file id)."""
    if purpose not in (None, "fine-tune"):
        return {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    cursor = fine_tuning.owned_file(session, principal.team_id, after, "after") if after else None
    rows, has_more = keyset_page(
        session,
        select(Dataset).where(Dataset.team_id == principal.team_id),
        (col(Dataset.created_at), col(Dataset.id)),
        cursor,
        limit,
        descending=order == "desc",
    )
    data = [fine_tuning.file_object(d) for d in rows]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/{file_id}")
def retrieve_file(session: SessionDep, principal: Viewer, file_id: str) -> dict[str, Any]:
    if file_id.startswith(fine_tuning.RESULTS_PREFIX):
        return fine_tuning.results_file_object(_results_of(session, principal.team_id, file_id))
    return fine_tuning.file_object(fine_tuning.owned_file(session, principal.team_id, file_id))


@router.get("/{file_id}/content", response_model=None)
def file_content(
    session: SessionDep, storage: StorageDep, principal: Viewer, file_id: str
) -> StreamingResponse | PlainTextResponse:
    """The rows as JSON lines (as stored: each uploaded row, re-serialised), or a job's results CSV."""
    if file_id.startswith(fine_tuning.RESULTS_PREFIX):
        experiment = _results_of(session, principal.team_id, file_id)
        return PlainTextResponse(fine_tuning.results_csv(session, experiment), media_type="text/csv")
    dataset = fine_tuning.owned_file(session, principal.team_id, file_id)
    return StreamingResponse(curation.export_jsonl(storage, dataset), media_type="application/jsonl")


@router.delete("/{file_id}")
def delete_file(session: SessionDep, storage: StorageDep, principal: Trainer, file_id: str) -> dict[str, Any]:
    """Delete the dataset (409 while a job uses it)."""
    dataset = fine_tuning.owned_file(session, principal.team_id, file_id)
    datasets_service.delete_dataset(session=session, storage=storage, actor=principal, dataset=dataset)
    return {"id": file_id, "object": "file", "deleted": True}


def _results_of(session: Session, team_id: uuid.UUID, file_id: str) -> Experiment:
    job = fine_tuning.JOB_PREFIX + file_id.removeprefix(fine_tuning.RESULTS_PREFIX)
    experiment = fine_tuning.owned_job(session, team_id, job)
    if not experiment.status.terminal:
        raise InvalidRequest("file_id", f"no such file: {file_id!r}", status_code=404)
    return experiment
