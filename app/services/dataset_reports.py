"""The dataset report, asked for over the API: computed once per (rows, tokenizer, length, shape) and kept.

A report is a ``DatasetReportRecord`` found by its cache key. Small datasets (at most
``api.report_inline_rows`` rows) are computed in the request; larger ones are handed to a worker on the
default queue (``studio.dataset_report``, through the outbox) and answered ``pending`` until it is ready.
A failed computation is tried again on the next request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from app.core import outbox
from app.core.config import Settings
from app.core.layout import read_dataset_rows
from app.core.queues import DATASET_REPORT_TASK, DEFAULT_QUEUE
from app.core.storage import Storage
from app.datasets.estimate import TrainingShape
from app.datasets.quality import tokenizer_digest
from app.datasets.report import REPORT_VERSION, fill_record
from app.models import Dataset, DatasetReport, DatasetReportRecord, ReportStatus
from app.services.errors import InvalidRequest


def training_shape(
    settings: Settings, *, method: str, batch_size: int, lora_r: int, gradient_checkpointing: bool, queue: str | None
) -> TrainingShape:
    """The shape the estimate assumes; ``queue`` (a training queue) gives the GPU class and whether it is CUDA."""
    name = queue or settings.training.default_queue
    match = next((q for q in settings.training.queues if q.name == name), None)
    if match is None:
        known = [q.name for q in settings.training.queues]
        raise InvalidRequest("queue", f"unknown training queue {name!r}; this deployment has {known}")
    return TrainingShape(
        method=method,
        batch_size=batch_size,
        lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing,
        gpu_class=name.removeprefix("train."),
        cuda=match.cuda,
    )


def cache_key(dataset: Dataset, model_dir: Path, request: dict[str, Any]) -> str:
    config = model_dir / "config.json"
    parts = {
        "version": REPORT_VERSION,
        "rows": dataset.content_hash,
        "format": dataset.format.value,
        "tokenizer": tokenizer_digest(model_dir),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        **{k: v for k, v in request.items() if k != "base_model"},  # the model counts by its files, not its path
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def get_report(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    dataset: Dataset,
    model_dir: Path,
    base_model: str,
    max_seq_length: int,
    train_on_prompt: bool,
    sample_rows: int,
    method: str,
    batch_size: int,
    lora_r: int,
    gradient_checkpointing: bool,
    queue: str | None,
) -> DatasetReport:
    """The report for this dataset, model and run shape: kept, computed now, or pending on a worker."""
    shape = training_shape(
        settings,
        method=method,
        batch_size=batch_size,
        lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing,
        queue=queue,
    )
    request = {
        "base_model": str(model_dir),
        "max_seq_length": max_seq_length,
        "train_on_prompt": train_on_prompt,
        "sample_rows": sample_rows,
        "shape": asdict(shape),
    }
    key = cache_key(dataset, model_dir, request)
    record = session.exec(select(DatasetReportRecord).where(DatasetReportRecord.cache_key == key)).first()
    if record is None or record.status is ReportStatus.failed:
        record = _start(session, storage, settings, dataset, key, request, record)
    answer = {"id": dataset.id, "format": dataset.format, "base_model": base_model, "status": record.status}
    answer |= {"train_on_prompt": train_on_prompt, "max_seq_length": max_seq_length, "error": record.error}
    return DatasetReport.model_validate({**(record.result or {}), **answer})


def _start(
    session: Session,
    storage: Storage,
    settings: Settings,
    dataset: Dataset,
    key: str,
    request: dict[str, Any],
    failed: DatasetReportRecord | None,
) -> DatasetReportRecord:
    record = failed or DatasetReportRecord(dataset_id=dataset.id, cache_key=key, request=request)
    record.status, record.error, record.result = ReportStatus.pending, None, None
    if dataset.row_count <= settings.api.report_inline_rows:
        fill_record(record, rows=read_dataset_rows(storage, dataset.id), fmt=dataset.format)
    else:
        session.add(record)
        session.flush()
        outbox.enqueue(
            session=session, task_name=DATASET_REPORT_TASK, queue=DEFAULT_QUEUE, payload={"report_id": str(record.id)}
        )
    session.add(record)
    try:
        session.commit()
    except IntegrityError:  # the same report, started by a concurrent request: use that one
        session.rollback()
        return session.exec(select(DatasetReportRecord).where(DatasetReportRecord.cache_key == key)).one()
    session.refresh(record)
    return record
