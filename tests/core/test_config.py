from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import Settings


def test_embedded_defaults_live_under_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("STUDIO_DATABASE__URL", "STUDIO_BROKER__URL", "STUDIO_EVENTS__REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings(data_dir=tmp_path)
    assert settings.database.url == f"sqlite:///{tmp_path / 'studio.db'}"
    assert settings.broker.url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert settings.storage.root == str(tmp_path / "storage")
    assert settings.events.redis_url == ""


def test_nested_env_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_TRAINING__QUEUES", '[{"name": "train.h100", "cuda": true}]')
    monkeypatch.setenv("STUDIO_TRAINING__DEFAULT_QUEUE", "train.h100")
    monkeypatch.setenv("STUDIO_STORAGE__BACKEND", "s3")
    settings = Settings()
    assert settings.train_queue("train.h100") is not None and settings.storage.backend == "s3"
    monkeypatch.setenv("STUDIO_TRAINING__DEFAULT_QUEUE", "train.nope")
    with pytest.raises(ValidationError, match="default_queue"):
        Settings()


def test_production_refuses_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_DATABASE__URL", "sqlite:///x.db")
    with pytest.raises(ValidationError, match="production needs Postgres"):
        Settings(environment="production")
