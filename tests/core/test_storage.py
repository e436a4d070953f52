from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from app.core.config import StorageSettings
from app.core.storage import LocalStorage, S3Storage, Storage, download_prefix, upload_dir


def _roundtrip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    upload_dir(storage, src, "runs/1")
    storage.put_bytes("runs/2/c.txt", b"other run")
    assert sorted(o.key for o in storage.list("runs/1")) == ["runs/1/a.txt", "runs/1/sub/b.bin"]
    assert storage.exists("runs/1/a.txt") and not storage.exists("runs/1/zzz")
    with storage.open("runs/1/a.txt") as f:
        assert f.read() == b"alpha"
    download_prefix(storage, "runs/1", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    storage.delete_prefix("runs/1")
    assert storage.list("runs/1") == [] and storage.exists("runs/2/c.txt")


def test_local_storage_roundtrip(tmp_path: Path) -> None:
    _roundtrip(LocalStorage(tmp_path / "store"), tmp_path)


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b", ""])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        LocalStorage(tmp_path).put_bytes(key, b"x")


def test_s3_storage_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="studio")
        settings = StorageSettings(backend="s3", s3_bucket="studio", s3_prefix="prod")
        storage = S3Storage(settings, client=client)
        _roundtrip(storage, tmp_path)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="studio")["Contents"]]
        assert keys == ["prod/runs/2/c.txt"]
