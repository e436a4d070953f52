"""`EngineManager` with fake engines (no weights, no torch forward): what it loads, keeps, evicts and unloads.

The database it reports to is a throwaway SQLite file (only its two tables), so these tests need neither
Postgres nor Redis nor a Celery worker. Every wait has a timeout, so a deadlock fails instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

from app.core.config import InferenceSettings, Settings
from app.core.db import make_engine
from app.models import InferenceCommand, InferenceWorker
from workers.inference import AdapterInUse, InferenceEngine
from workers.serving import manager as manager_module
from workers.serving.manager import EngineManager, WorkerBusy

pytestmark = pytest.mark.fast

WAIT_S = 10.0
ADAPTER = "0b9c5c1e-7d1f-4a39-9d6b-2f0c7f0e8a11"  # adapters are named by deployment id


class FakeEngine:
    """What the manager uses of an `InferenceEngine`: stats, info, close, unload_adapter."""

    def __init__(self, base_model: str) -> None:
        self.base_model = base_model
        self.closed = False
        self.running = 0
        self.waiting = 0
        self.adapters: list[str] = []
        self.adapters_in_use: set[str] = set()

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "loaded_adapters": list(self.adapters)}

    def info(self) -> dict[str, Any]:
        return {"model_path": self.base_model}

    def close(self) -> None:
        self.closed = True

    def unload_adapter(self, name: str) -> None:
        if name in self.adapters_in_use:
            raise AdapterInUse(f"adapter {name!r} is used by a running request")
        self.adapters.remove(name)


class Factory:
    """The manager's engine factory; `gate`, when set, holds every load until it is released."""

    def __init__(self) -> None:
        self.built: list[FakeEngine] = []
        self.gate: threading.Event | None = None
        self.loading = threading.Event()  # a load has started (and may be waiting on the gate)

    def __call__(self, base_model: str) -> InferenceEngine:
        self.loading.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        engine = FakeEngine(base_model)
        self.built.append(engine)
        return cast(InferenceEngine, engine)


class FakeStorage:
    def __init__(self) -> None:
        self.downloads: list[str] = []

    def download(self, key: str, path: Path) -> None:
        self.downloads.append(key)
        path.write_text(key)


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The manager's `session_scope`, on a SQLite file holding the inference worker and command tables."""
    engine = make_engine(f"sqlite:///{tmp_path / 'studio.db'}")
    tables = [SQLModel.metadata.tables["inference_worker"], SQLModel.metadata.tables["inference_command"]]
    SQLModel.metadata.create_all(engine, tables=tables)

    @contextmanager
    def scope() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as session:
            yield session

    monkeypatch.setattr(manager_module, "session_scope", scope)
    yield engine
    engine.dispose()


@pytest.fixture
def factory() -> Factory:
    return Factory()


@pytest.fixture
def make_manager(tmp_path: Path, factory: Factory) -> Iterator[Callable[..., EngineManager]]:
    made: list[EngineManager] = []

    def make(max_base_models: int = 1, **inference: Any) -> EngineManager:
        settings = Settings(
            inference=InferenceSettings(
                max_base_models=max_base_models, cache_dir=str(tmp_path / "adapters"), **inference
            )
        )
        manager = EngineManager(settings, "worker-1", engine_factory=factory)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager._stop.set()


def fake(engine: InferenceEngine) -> FakeEngine:
    assert isinstance(engine, FakeEngine)
    return engine


# --------------------------------------------------------------------------------------------- engines


def test_using_loads_a_base_model_once_and_reports_it(
    make_manager: Callable[..., EngineManager], factory: Factory
) -> None:
    manager = make_manager()
    with manager.using("base-a") as first:
        assert fake(first).base_model == "base-a"
    with manager.using("base-a") as again:
        assert again is first
    assert len(factory.built) == 1
    manager.begin()
    stats = manager.stats()
    manager.end()
    assert stats["requests_in_flight"] == 1 and manager.stats()["requests_in_flight"] == 0
    assert stats["models"] == {"base-a": {"running": 0, "waiting": 0, "loaded_adapters": [], "model_path": "base-a"}}
    assert stats["loading"] == [] and stats["concurrency"] == manager.settings.concurrency


def test_max_base_models_evicts_the_least_recently_used_idle_engine(
    make_manager: Callable[..., EngineManager], factory: Factory
) -> None:
    manager = make_manager(max_base_models=2)
    for name in ["a", "b", "a"]:  # "a" used last: "b" is the least recently used
        with manager.using(name):
            pass
    with manager.using("c"):
        assert sorted(manager.stats()["models"]) == ["a", "c"]
    a, b, c = factory.built
    assert b.closed and not a.closed and not c.closed


def test_an_engine_in_use_is_never_evicted(make_manager: Callable[..., EngineManager], factory: Factory) -> None:
    manager = make_manager(max_base_models=1)
    with manager.using("a") as held, pytest.raises(WorkerBusy):
        manager._acquire("b")
    fake(held).running = 1  # released by its caller, but the engine still has work in flight
    with pytest.raises(WorkerBusy):
        manager._acquire("b")
    fake(held).running, fake(held).waiting = 0, 1
    with pytest.raises(WorkerBusy):
        manager._acquire("b")
    assert not fake(held).closed and list(manager.stats()["models"]) == ["a"]

    fake(held).waiting = 0
    with manager.using("b") as other:
        assert fake(other).base_model == "b"
    assert fake(held).closed and list(manager.stats()["models"]) == ["b"]


def test_concurrent_requests_share_one_load_which_counts_against_the_limit(
    make_manager: Callable[..., EngineManager], factory: Factory
) -> None:
    manager = make_manager(max_base_models=1)
    factory.gate = threading.Event()

    def use(name: str) -> InferenceEngine:
        with manager.using(name) as engine:
            return engine

    with ThreadPoolExecutor(2) as pool:
        futures: list[Future[InferenceEngine]] = [pool.submit(use, "a") for _ in range(2)]
        assert factory.loading.wait(WAIT_S)
        assert manager.stats()["loading"] == ["a"]
        assert manager.unload("a") is False  # still loading: the unload is retried later
        with pytest.raises(WorkerBusy):  # the load in progress holds the only slot
            manager._acquire("b")
        factory.gate.set()
        first, second = (future.result(WAIT_S) for future in futures)
    assert first is second and len(factory.built) == 1
    assert manager.stats()["loading"] == [] and manager.unload("a") is True


def test_unload_base_model_once_idle(make_manager: Callable[..., EngineManager], factory: Factory) -> None:
    manager = make_manager()
    assert manager.unload("never-loaded") is True  # nothing to do
    with manager.using("a") as engine:
        assert manager.unload("a") is False
        assert not fake(engine).closed
    assert manager.unload("a") is True
    assert fake(engine).closed and manager.stats()["models"] == {}
    with manager.using("a") as reloaded:  # loads again on the next request
        assert reloaded is not engine


# --------------------------------------------------------------------------------------------- adapters


def test_adapter_dir_fetches_once_and_never_makes_a_path_of_other_names(
    make_manager: Callable[..., EngineManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FakeStorage()
    monkeypatch.setattr(manager_module, "get_storage", lambda: storage)
    manager = make_manager()
    directory = manager.adapter_dir(ADAPTER, "adapters/x")
    assert directory == manager.cache_dir / ADAPTER and (directory / ".complete").exists()
    assert sorted(p.name for p in directory.iterdir()) == [".complete", *manager_module.ADAPTER_FILES]
    assert manager.adapter_dir(ADAPTER, "adapters/x") == directory
    assert storage.downloads == [f"adapters/x/{name}" for name in manager_module.ADAPTER_FILES]
    for bad in ["../escape", "a/b", ""]:
        with pytest.raises(ValueError, match="not an adapter name"):
            manager.adapter_dir(bad, "adapters/x")


def test_unload_adapter_from_every_engine_then_drop_its_files(
    make_manager: Callable[..., EngineManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "get_storage", FakeStorage)
    manager = make_manager(max_base_models=2)
    directory = manager.adapter_dir(ADAPTER, "adapters/x")
    with manager.using("a") as a, manager.using("b") as b:
        fake(a).adapters = [ADAPTER]
        fake(b).adapters = [ADAPTER, "other"]
        fake(b).adapters_in_use = {ADAPTER}
    assert manager.unload(ADAPTER) is False  # in use on "b": its files stay, the caller retries
    assert fake(a).adapters == [] and fake(b).adapters == [ADAPTER, "other"] and directory.exists()
    fake(b).adapters_in_use = set()
    assert manager.unload(ADAPTER) is True
    assert fake(b).adapters == ["other"] and not directory.exists()
    assert not fake(a).closed and not fake(b).closed  # unloading an adapter keeps its engines


# --------------------------------------------------------------------------------------------- heartbeat


def commands(database: Engine, *targets: str) -> None:
    with Session(database) as session:
        for target in targets:
            session.add(InferenceCommand(action="unload", target=target))
        session.commit()


def test_heartbeat_reports_and_applies_only_new_unload_commands(
    make_manager: Callable[..., EngineManager], factory: Factory, database: Engine
) -> None:
    manager = make_manager(max_base_models=2, heartbeat_interval_s=3600.0)  # heartbeats driven by hand
    with manager.using("a"), manager.using("b"):
        pass
    commands(database, "a")  # sent before the worker started: not its business
    manager.start()
    with Session(database) as session:
        row = session.get(InferenceWorker, "worker-1")
        assert row is not None and sorted(row.stats["models"]) == ["a", "b"]

    with manager.using("b"):
        commands(database, "b")
        manager._apply_commands()  # "b" is busy: kept for a later heartbeat
        assert [target for _, target in manager._pending] == ["b"]
    manager._apply_commands()
    manager._report()
    a, b = factory.built
    assert b.closed and not a.closed and manager._pending == []
    with Session(database) as session:
        row = session.get(InferenceWorker, "worker-1")
        assert row is not None and list(row.stats["models"]) == ["a"]

    manager.close()
    assert a.closed
    with Session(database) as session:
        assert session.exec(select(InferenceWorker)).all() == []
