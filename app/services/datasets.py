"""Create datasets: validate every row first, then write storage, then the row. Bad input stores nothing."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, func, select

from app.core.layout import dataset_prefix, dataset_rows_key, dataset_source_key
from app.core.storage import Storage
from app.datasets.formats import validate_rows
from app.datasets.readers import FileKind, NumberedRow, read_rows
from app.datasets.split import split_indices
from app.models import AbTest, Dataset, DatasetFormat, Experiment
from app.services import audit
from app.services.crud import paginate
from app.services.errors import Conflict
from app.services.principal import Principal

PREVIEW_ROWS = 5


def _build(
    *,
    session: Session,
    storage: Storage,
    actor: Principal,
    name: str,
    numbered: Iterable[NumberedRow],
    fmt: DatasetFormat | None,
    eval_fraction: float,
    content_hash: str,
    size_bytes: int,
    source: tuple[Path, str] | None,
) -> Dataset:
    rows: list[dict[str, Any]] = []

    def collect() -> Iterable[NumberedRow]:
        for number, row in numbered:
            rows.append(row)
            yield number, row

    detected = validate_rows(collect(), fmt)
    train, held_out = split_indices(rows, eval_fraction)
    dataset = Dataset(
        team_id=actor.team_id,
        name=name,
        format=detected,
        row_count=len(rows),
        train_rows=len(train),
        eval_rows=len(held_out),
        eval_fraction=eval_fraction,
        content_hash=content_hash,
        size_bytes=size_bytes,
        storage_prefix="",
        preview=rows[:PREVIEW_ROWS],
    )
    dataset.storage_prefix = dataset_prefix(dataset.id)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    try:
        storage.put_bytes(dataset_rows_key(dataset.id), body)
        if source:
            storage.put_file(dataset_source_key(dataset.id, source[1]), source[0])
        session.add(dataset)
        audit.record(
            session=session,
            actor=actor,
            action="dataset.create",
            target_type="dataset",
            target_id=dataset.id,
            name=name,
            rows=len(rows),
        )
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete_prefix(dataset.storage_prefix)
        raise
    session.refresh(dataset)
    return dataset


def create_from_file(
    *,
    session: Session,
    storage: Storage,
    actor: Principal,
    name: str,
    path: Path,
    kind: FileKind,
    fmt: DatasetFormat | None,
    eval_fraction: float,
) -> Dataset:
    return _build(
        session=session,
        storage=storage,
        actor=actor,
        name=name,
        numbered=read_rows(path, kind),
        fmt=fmt,
        eval_fraction=eval_fraction,
        content_hash=_file_sha256(path),
        size_bytes=path.stat().st_size,
        source=(path, kind),
    )


def create_from_rows(
    *,
    session: Session,
    storage: Storage,
    actor: Principal,
    name: str,
    rows: list[dict[str, Any]],
    fmt: DatasetFormat | None,
    eval_fraction: float,
) -> Dataset:
    body = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    return _build(
        session=session,
        storage=storage,
        actor=actor,
        name=name,
        numbered=enumerate(rows, start=1),
        fmt=fmt,
        eval_fraction=eval_fraction,
        content_hash=hashlib.sha256(body.encode()).hexdigest(),
        size_bytes=len(body),
        source=None,
    )


def delete_dataset(*, session: Session, storage: Storage, actor: Principal, dataset: Dataset) -> None:
    """Delete rows and files; refused while an experiment still points at the dataset."""
    used = session.exec(select(func.count()).select_from(Experiment).where(Experiment.dataset_id == dataset.id)).one()
    if used:
        raise Conflict(f"dataset is used by {used} experiment(s); delete those first", field="dataset_id")
    for test in session.exec(select(AbTest).where(AbTest.dataset_id == dataset.id)).all():
        test.dataset_id = None  # past A/B results stay; they just no longer point at the rows
        session.add(test)
    session.delete(dataset)
    audit.record(
        session=session,
        actor=actor,
        action="dataset.delete",
        target_type="dataset",
        target_id=dataset.id,
        name=dataset.name,
    )
    session.commit()
    storage.delete_prefix(dataset.storage_prefix)  # after commit: a failed delete leaves files, never a dangling row


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_datasets(*, session: Session, team_id: uuid.UUID, skip: int, limit: int) -> tuple[list[Dataset], int]:
    query = select(Dataset).where(Dataset.team_id == team_id).order_by(col(Dataset.created_at).desc())
    return paginate(session=session, query=query, skip=skip, limit=limit)
