"""Read uploaded files (JSONL, JSON, CSV, Parquet) into numbered rows.

Rows are numbered for error messages: JSONL by line, the others by record (1-based).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from app.datasets.formats import DatasetInvalid, RowError

FileKind = Literal["jsonl", "json", "csv", "parquet"]
EXTENSIONS: dict[str, FileKind] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
NumberedRow = tuple[int, dict[str, Any]]


def sniff_kind(filename: str | None, head: bytes) -> FileKind:
    """File kind from the extension, else from the first bytes."""
    suffix = Path(filename or "").suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip()
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    return "csv"


def read_rows(path: Path, kind: FileKind) -> Iterator[NumberedRow]:
    readers = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}
    yield from readers[kind](path)


def _jsonl(path: Path) -> Iterator[NumberedRow]:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DatasetInvalid([RowError(number, "*", f"invalid JSON: {exc}")]) from None


def _json(path: Path) -> Iterator[NumberedRow]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetInvalid([RowError(0, "*", f"invalid JSON: {exc}")]) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetInvalid([RowError(0, "*", "a JSON file must hold a list of rows")])
    yield from enumerate(data, start=1)


def _csv(path: Path) -> Iterator[NumberedRow]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetInvalid([RowError(0, "*", f"CSV must be UTF-8: {exc}")]) from None
    reader = csv.DictReader(io.StringIO(text))
    for number, row in enumerate(reader, start=1):
        # Empty cells are missing values, so "required" checks name the field.
        yield number, {k: v for k, v in row.items() if k is not None and v not in ("", None)}


def _parquet(path: Path) -> Iterator[NumberedRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetInvalid([RowError(0, "*", f"unreadable Parquet file: {exc}")]) from None
    for batch_start, batch in _batches(table):
        for offset, row in enumerate(batch.to_pylist()):
            yield batch_start + offset + 1, row


def _batches(table: Any) -> Iterator[tuple[int, Any]]:
    start = 0
    for batch in table.to_batches(max_chunksize=4096):
        yield start, batch
        start += batch.num_rows
