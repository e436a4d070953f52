"""Create datasets: validate every row first, then write storage, then the row. Bad input stores nothing.

Rows stream through: a reader (``app.datasets.readers``) yields them one at a time within ``Limits``,
each is validated and written to a local spool file as JSON lines, and only the first few (the preview)
are kept. Once every row is valid the spool goes to storage as ``rows.jsonl``. Memory does not grow with
the number of rows; see docs/reliability.md, "Bounded uploads".
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import delete
from sqlmodel import Session, col, func, select

from app.core.config import ApiSettings
from app.core.layout import dataset_prefix, dataset_rows_key, dataset_source_key
from app.core.storage import Storage
from app.datasets.formats import DatasetInvalid, RowError, validate_rows
from app.datasets.readers import FileKind, Limits, NumberedRow, check_rows, read_rows
from app.datasets.split import split_sizes
from app.models import AbTest, Dataset, DatasetFormat, DatasetReportRecord, Experiment
from app.services import audit
from app.services.crud import paginate
from app.services.errors import Conflict
from app.services.principal import Principal

PREVIEW_ROWS = 5
_TO_JSON = json.JSONEncoder(ensure_ascii=False).encode  # as rows.jsonl has always held them
_TO_SORTED_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode  # what an inline body's hash covers


def upload_limits(api: ApiSettings) -> Limits:
    return Limits(
        max_rows=api.max_dataset_rows,
        max_row_bytes=api.max_row_bytes,
        max_cell_bytes=api.max_cell_bytes,
        max_json_depth=api.max_json_depth,
        max_dataset_bytes=api.max_dataset_bytes,
        parquet_memory_bytes=api.parquet_memory_bytes,
    )


class _Spool:
    """Validated rows on their way to storage: written to a local file as they pass, never kept."""

    def __init__(self, out: BinaryIO, limits: Limits) -> None:
        self.out, self.limits = out, limits
        self.count = 0
        self.bytes = 0
        self.preview: list[dict[str, Any]] = []

    def through(self, numbered: Iterable[NumberedRow]) -> Generator[NumberedRow]:
        for number, row in numbered:
            line = _json_line(number, row)
            if len(line) > self.limits.max_row_bytes + 1:
                raise self.limits.row_too_large(number, str(len(line) - 1))
            self.bytes += len(line)
            if self.bytes > self.limits.max_dataset_bytes:
                message = (
                    f"the rows come to more than the {self.limits.max_dataset_bytes}-byte limit as JSON lines "
                    "(api.max_dataset_bytes)"
                )
                raise DatasetInvalid([RowError(number, "*", message)])
            self.out.write(line)
            self.count += 1
            if len(self.preview) < PREVIEW_ROWS:
                self.preview.append(row)
            yield number, row


def _json_line(number: int, row: Any) -> bytes:
    """One stored line, as ``read_dataset_rows`` reads it back; a value with no JSON form is a row error."""
    try:
        text = _TO_JSON(row)
    except (TypeError, ValueError) as exc:
        field = next((k for k, v in row.items() if not _dumps_ok(v)), "*") if isinstance(row, dict) else "*"
        raise DatasetInvalid([RowError(number, str(field), f"has no JSON form: {exc}")]) from None
    return (text + "\n").encode()  # the readers refused lone surrogates, so every text has a UTF-8 form


def _dumps_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _build(
    *,
    session: Session,
    storage: Storage,
    actor: Principal,
    name: str,
    numbered: Iterable[NumberedRow],
    fmt: DatasetFormat | None,
    eval_fraction: float,
    content: Callable[[], tuple[str, int]],
    source: tuple[Path, str] | None,
    limits: Limits,
    parent_id: uuid.UUID | None = None,
    origin: dict[str, Any] | None = None,
) -> Dataset:
    """``content`` gives (content_hash, size_bytes) once every row has gone through; ``parent_id`` and
    ``origin`` record the version this one was made from, and how."""
    with tempfile.TemporaryDirectory(prefix="studio-dataset-") as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        with rows_path.open("wb") as out:
            spool = _Spool(out, limits)
            through = spool.through(numbered)
            try:
                detected = validate_rows(through, fmt)
            finally:  # stop the reader now, not when the exception is collected (a Parquet child exits)
                through.close()
                if isinstance(numbered, Generator):
                    numbered.close()
        train_rows, eval_rows = split_sizes(spool.count, eval_fraction)
        content_hash, size_bytes = content()
        dataset = Dataset(
            team_id=actor.team_id,
            name=name,
            format=detected,
            row_count=spool.count,
            train_rows=train_rows,
            eval_rows=eval_rows,
            eval_fraction=eval_fraction,
            content_hash=content_hash,
            size_bytes=size_bytes,
            storage_prefix="",
            preview=spool.preview,
            parent_id=parent_id,
            origin=origin,
        )
        dataset.storage_prefix = dataset_prefix(dataset.id)
        try:
            storage.put_file(dataset_rows_key(dataset.id), rows_path)
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
                rows=spool.count,
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
    limits: Limits | None = None,
) -> Dataset:
    limits = limits or Limits()
    return _build(
        session=session,
        storage=storage,
        actor=actor,
        name=name,
        numbered=read_rows(path, kind, limits),
        fmt=fmt,
        eval_fraction=eval_fraction,
        content=lambda: (_file_sha256(path), path.stat().st_size),
        source=(path, kind),
        limits=limits,
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
    limits: Limits | None = None,
    parent_id: uuid.UUID | None = None,
    origin: dict[str, Any] | None = None,
) -> Dataset:
    limits = limits or Limits()
    digest = hashlib.sha256()
    size = 0

    def hashed() -> Iterator[NumberedRow]:
        nonlocal size
        for number, row in check_rows(rows, limits):
            line = _TO_SORTED_JSON(row) + "\n"
            digest.update(line.encode("utf-8", "surrogatepass"))
            size += len(line)
            yield number, row

    return _build(
        session=session,
        storage=storage,
        actor=actor,
        name=name,
        numbered=hashed(),
        fmt=fmt,
        eval_fraction=eval_fraction,
        content=lambda: (digest.hexdigest(), size),
        source=None,
        limits=limits,
        parent_id=parent_id,
        origin=origin,
    )


def delete_dataset(*, session: Session, storage: Storage, actor: Principal, dataset: Dataset) -> None:
    """Delete rows and files; refused while an experiment still points at the dataset."""
    uses = (Experiment.dataset_id == dataset.id) | (Experiment.validation_dataset_id == dataset.id)
    used = session.exec(select(func.count()).select_from(Experiment).where(uses)).one()
    if used:
        raise Conflict(f"dataset is used by {used} experiment(s); delete those first", field="dataset_id")
    for test in session.exec(select(AbTest).where(AbTest.dataset_id == dataset.id)).all():
        test.dataset_id = None  # past A/B results stay; they just no longer point at the rows
        session.add(test)
    session.execute(delete(DatasetReportRecord).where(col(DatasetReportRecord.dataset_id) == dataset.id))
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
