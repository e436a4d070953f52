"""Datasets: upload a file or post rows inline; list, read, preview, and what the loss will see of them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Response, UploadFile
from fastapi.responses import StreamingResponse

from app.api.deps import Page, SessionDep, SettingsDep, StorageDep, Trainer, Viewer, get_owned_or_404
from app.api.errors import PayloadTooLarge
from app.api.idempotency import idempotent
from app.api.uploads import spooled_upload
from app.models import (
    Dataset,
    DatasetCreate,
    DatasetCurate,
    DatasetFormat,
    DatasetPreview,
    DatasetPublic,
    DatasetReport,
    DatasetsPublic,
    ReportStatus,
)
from app.services import curation, dataset_reports
from app.services import datasets as service
from app.services.errors import InvalidRequest
from app.services.experiments import check_base_model

router = APIRouter(prefix="/datasets", tags=["datasets"])
CHUNK = 1 << 20


@router.post("/upload", response_model=DatasetPublic, status_code=201)
@idempotent
def upload_dataset(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: Trainer,
    file: UploadFile,
    name: Annotated[str | None, Form(max_length=200)] = None,
    format: Annotated[DatasetFormat | None, Form(description="Detected when omitted")] = None,
    eval_fraction: Annotated[float, Form(ge=0, lt=1)] = 0.1,
) -> DatasetPublic:
    """Upload JSONL, JSON, CSV or Parquet (multipart field `file`).

    The file is read as a stream within `api.max_dataset_rows`, `api.max_row_bytes`, `api.max_cell_bytes`,
    `api.max_json_depth` and `api.max_dataset_bytes`; a file beyond one is a 422 naming the row (and the
    field), and stores nothing.
    """
    with spooled_upload(file, settings.api.max_upload_bytes) as (path, kind):
        dataset = service.create_from_file(
            session=session,
            storage=storage,
            actor=principal,
            name=name or Path(file.filename or "dataset").stem[:200] or "dataset",
            path=path,
            kind=kind,
            fmt=format,
            eval_fraction=eval_fraction,
            limits=service.upload_limits(settings.api),
        )
    return DatasetPublic.model_validate(dataset)


@router.post("/", response_model=DatasetPublic, status_code=201)
@idempotent
def create_dataset(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: Trainer,
    body: DatasetCreate,
) -> DatasetPublic:
    """Create a dataset from rows in the request body."""
    if len(body.rows) > settings.api.max_inline_rows:
        raise PayloadTooLarge(f"rows: more than {settings.api.max_inline_rows} rows; upload a file")
    dataset = service.create_from_rows(
        session=session,
        storage=storage,
        actor=principal,
        name=body.name,
        rows=body.rows,
        fmt=body.format,
        eval_fraction=body.eval_fraction,
        limits=service.upload_limits(settings.api),
    )
    return DatasetPublic.model_validate(dataset)


@router.get("/", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, principal: Viewer, page: Page) -> DatasetsPublic:
    """List the team's datasets, newest first."""
    rows, count = service.list_datasets(session=session, team_id=principal.team_id, skip=page.skip, limit=page.limit)
    return DatasetsPublic(data=[DatasetPublic.model_validate(d) for d in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(session: SessionDep, principal: Viewer, dataset_id: uuid.UUID) -> DatasetPublic:
    """One dataset's metadata."""
    return DatasetPublic.model_validate(_get(session, principal.team_id, dataset_id))


@router.get("/{dataset_id}/preview", response_model=DatasetPreview)
def preview_dataset(session: SessionDep, principal: Viewer, dataset_id: uuid.UUID) -> DatasetPreview:
    """The first rows, as uploaded."""
    dataset = _get(session, principal.team_id, dataset_id)
    return DatasetPreview(id=dataset.id, format=dataset.format, rows=dataset.preview)


@router.get(
    "/{dataset_id}/report",
    response_model=DatasetReport,
    responses={202: {"model": DatasetReport, "description": "Being computed by a worker: ask again"}},
)
def dataset_report(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: Viewer,
    response: Response,
    dataset_id: uuid.UUID,
    base_model: Annotated[
        str | None, Query(min_length=1, max_length=500, description="Local model directory or name (required)")
    ] = None,
    max_seq_length: Annotated[
        int, Query(ge=8, le=1_048_576, description="Tokens per sequence; longer rows are cut")
    ] = 1024,
    train_on_prompt: bool = False,
    rows: Annotated[int, Query(ge=1, le=20, description="Rows rendered with what the loss sees")] = 1,
    method: Annotated[Literal["lora", "qlora", "full"], Query(description="For the memory estimate")] = "lora",
    batch_size: Annotated[int, Query(ge=1, le=4096, description="Micro-batch, for the memory estimate")] = 4,
    lora_r: Annotated[int, Query(ge=1, le=1024, description="LoRA rank, for the memory estimate")] = 16,
    gradient_checkpointing: bool = False,
    queue: Annotated[
        str | None, Query(max_length=100, description="Training queue (GPU class) to estimate for")
    ] = None,
) -> DatasetReport:
    """What training on this dataset with ``base_model`` will meet: the first rows rendered with what the
    loss sees, token lengths and what ``max_seq_length`` cuts, duplicates, short answers, anomalies, an
    estimate of peak memory and time per epoch, and the problems that block training. Computed once and
    kept; a large dataset's report is computed by a worker (202 with status ``pending`` until it is ready)."""
    dataset = _get(session, principal.team_id, dataset_id)  # before anything else: another team's id is a 404
    if base_model is None:
        raise InvalidRequest("base_model", "required: the model whose tokenizer and chat template render the rows")
    if max_seq_length > settings.training.max_seq_length_cap:
        raise InvalidRequest(
            "max_seq_length", f"at most {settings.training.max_seq_length_cap} (training.max_seq_length_cap)"
        )
    model = Path(check_base_model(base_model, settings))
    if not model.is_dir():
        raise InvalidRequest("base_model", "the report renders with a local model directory; Hub ids are not fetched")
    report = dataset_reports.get_report(
        session=session,
        storage=storage,
        settings=settings,
        dataset=dataset,
        model_dir=model,
        base_model=base_model,
        max_seq_length=max_seq_length,
        train_on_prompt=train_on_prompt,
        sample_rows=rows,
        method=method,
        batch_size=batch_size,
        lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing,
        queue=queue,
    )
    if report.status is ReportStatus.pending:
        response.status_code = 202
    return report


@router.post("/{dataset_id}/curate", response_model=DatasetPublic, status_code=201)
@idempotent
def curate_dataset(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: Trainer,
    dataset_id: uuid.UUID,
    body: DatasetCurate,
) -> DatasetPublic:
    """A new version of the dataset, filtered (empty answers, token bounds, exact or near duplicates, a
    sample, a new eval split); it links to this one (``parent_id``) and says what each filter dropped."""
    parent = _get(session, principal.team_id, dataset_id)
    model_dir = None
    if body.base_model is not None:
        model_dir = Path(check_base_model(body.base_model, settings))
        if not model_dir.is_dir():
            raise InvalidRequest(
                "base_model", "token bounds count with a local model directory; Hub ids are not fetched"
            )
    dataset = curation.curate(
        session=session,
        storage=storage,
        actor=principal,
        parent=parent,
        body=body,
        model_dir=model_dir,
        limits=service.upload_limits(settings.api),
    )
    return DatasetPublic.model_validate(dataset)


@router.get(
    "/{dataset_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}, "application/vnd.apache.parquet": {}}}},
)
def export_dataset(
    session: SessionDep,
    storage: StorageDep,
    principal: Viewer,
    dataset_id: uuid.UUID,
    format: Annotated[Literal["jsonl", "parquet"], Query(description="jsonl or parquet")] = "jsonl",
) -> StreamingResponse:
    """The stored rows as a file that `datasets.load_dataset("json" | "parquet", data_files=...)` reads."""
    dataset = _get(session, principal.team_id, dataset_id)
    if format == "parquet":
        chunks, media = curation.export_parquet(storage, dataset), "application/vnd.apache.parquet"
    else:
        chunks, media = curation.export_jsonl(storage, dataset), "application/x-ndjson"
    filename = f"{dataset.id}.{format}"
    return StreamingResponse(
        chunks, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(session: SessionDep, storage: StorageDep, principal: Trainer, dataset_id: uuid.UUID) -> None:
    """Delete a dataset and its files (409 while experiments use it)."""
    service.delete_dataset(
        session=session, storage=storage, actor=principal, dataset=_get(session, principal.team_id, dataset_id)
    )


def _get(session: SessionDep, team_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    return get_owned_or_404(session=session, model=Dataset, team_id=team_id, id=dataset_id, what="dataset")
