"""Object storage for datasets, checkpoints and artifacts: a local directory or S3 (boto3).

Keys are ``/``-separated and always built by our code from ids (``datasets/<uuid>/train.jsonl``);
user-supplied names never become part of a key, and ``_check_key`` refuses anything that could
escape the root.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from app.core.config import StorageSettings, get_settings


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int


class Storage(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def download(self, key: str, path: Path) -> None: ...
    def list(self, prefix: str) -> list[StoredObject]: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]):
        raise ValueError(f"invalid storage key {key!r}")
    if parts[-1] in (".", ".."):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / _check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)  # readers never see a half-written object

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(data)
        tmp.replace(dest)

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), path)

    def list(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix.rstrip("/") + "/x").parent
        if not base.is_dir():
            return []
        return [
            StoredObject(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in sorted(base.rglob("*"))
            if p.is_file() and not p.name.endswith(".partial")
        ]

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix.rstrip("/") + "/x").parent
        shutil.rmtree(base, ignore_errors=True)


class S3Storage:
    def __init__(self, settings: StorageSettings, client: Any = None) -> None:
        import boto3

        if not settings.s3_bucket:
            raise ValueError("storage.s3_bucket is required when storage.backend is s3")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        self.client = client or boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def open(self, key: str) -> BinaryIO:
        body: BinaryIO = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return body

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(path))

    def _iter(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix.rstrip("/") + "/x")[:-1]
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            yield from page.get("Contents", [])

    def list(self, prefix: str) -> list[StoredObject]:
        return [StoredObject(self._unkey(o["Key"]), o["Size"]) for o in self._iter(prefix)]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> None:
        for obj in self._iter(prefix):
            self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])


def make_storage(settings: StorageSettings) -> Storage:
    if settings.backend == "s3":
        return S3Storage(settings)
    return LocalStorage(Path(settings.root))


@lru_cache
def get_storage() -> Storage:
    return make_storage(get_settings().storage)


def upload_dir(storage: Storage, local_dir: Path, prefix: str) -> None:
    """Upload every file below ``local_dir`` under ``prefix``, keeping relative paths."""
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            storage.put_file(f"{prefix}/{path.relative_to(local_dir).as_posix()}", path)


def download_prefix(storage: Storage, prefix: str, local_dir: Path) -> None:
    for obj in storage.list(prefix):
        storage.download(obj.key, local_dir / obj.key[len(prefix.rstrip("/")) + 1 :])
