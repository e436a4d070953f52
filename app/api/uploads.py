"""A multipart upload, spooled to a private temporary file within the upload limit."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import UploadFile

from app.api.errors import PayloadTooLarge
from app.datasets.readers import FileKind, sniff_kind

CHUNK = 1 << 20


@contextlib.contextmanager
def spooled_upload(file: UploadFile, limit: int, field: str = "file") -> Iterator[tuple[Path, FileKind]]:
    """The upload as a file of ours (the client's filename never reaches the filesystem) and its sniffed
    kind; 413 naming ``field`` past ``limit`` bytes. The file is gone when the block ends."""
    with tempfile.TemporaryDirectory(prefix="studio-upload-") as tmp:
        path = Path(tmp) / "upload"
        size = 0
        with path.open("wb") as out:
            while chunk := file.file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"{field}: larger than the {limit}-byte upload limit")
                out.write(chunk)
        with path.open("rb") as f:
            kind = sniff_kind(file.filename, f.read(8))
        yield path, kind
