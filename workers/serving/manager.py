"""What an inference worker process holds: engines by base model (normally one), adapters fetched from
storage, and a heartbeat thread that reports stats to the database and applies admin commands.

Celery runs this worker with a thread pool: every request is a task thread that submits to the shared
engine and waits, so concurrent requests meet in the engine's running batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from app.core.config import Settings
from app.core.db import session_scope
from app.core.layout import STORED_MODEL
from app.core.queues import worker_queue
from app.core.storage import download_prefix, get_storage
from app.models import InferenceCommand, InferenceWorker, ModelPlacement, PlacementState, utcnow
from workers.inference import InferenceEngine
from workers.inference.adapters import AdapterError

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")  # a deployment id


class WorkerBusy(RuntimeError):
    """Every engine slot serves another base model with requests in flight."""


class EngineManager:
    def __init__(
        self,
        settings: Settings,
        worker_name: str,
        engine_factory: Callable[[str], InferenceEngine] | None = None,
    ) -> None:
        self.settings = settings.inference
        self.name = worker_name
        # Builds the engine of a base model; tests pass a fake (no weights), workers the real loader.
        self._engine_factory = engine_factory or self._load_engine
        self.cache_dir = Path(self.settings.cache_dir).resolve()
        self._engines: OrderedDict[str, InferenceEngine] = OrderedDict()
        self._lock = threading.Lock()  # guards the dicts and counters only; never held while loading weights
        self._loading: dict[str, threading.Lock] = {}
        self._loads_in_progress = 0  # counted against max_base_models like loaded engines
        self._users: dict[str, int] = {}  # requests holding each engine (inside using())
        self._adapter_locks: dict[str, threading.Lock] = {}
        self._in_flight = 0
        self._last_command = 0
        self._pending: list[tuple[int, str]] = []  # unload commands waiting for their engine to go idle
        self._loads: dict[str, dict[str, float]] = {}  # per base model: how often loaded, the last load's seconds
        self._preloading: set[str] = set()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="inference-heartbeat", daemon=True)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with session_scope() as session:  # commands sent before this worker started are not its business
            self._last_command = (
                session.exec(select(col(InferenceCommand.id)).order_by(col(InferenceCommand.id).desc())).first() or 0
            )
        self._report()
        self._heartbeat.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            engine.close()
        with session_scope() as session:
            row = session.get(InferenceWorker, self.name)
            if row is not None:
                session.delete(row)
                session.commit()

    # ---------------------------------------------------------------- engines and adapters

    @contextmanager
    def using(self, base_model: str) -> Iterator[InferenceEngine]:
        """The engine for a base model, loaded if needed, held (never evicted or unloaded) until exit."""
        engine = self._acquire(base_model)
        try:
            yield engine
        finally:
            with self._lock:
                self._users[base_model] -= 1

    def _acquire(self, base_model: str) -> InferenceEngine:
        with self._lock:
            engine = self._engines.get(base_model)
            if engine is not None:
                self._engines.move_to_end(base_model)
                self._users[base_model] = self._users.get(base_model, 0) + 1
                return engine
            loading = self._loading.setdefault(base_model, threading.Lock())
        with loading:  # one load per base model; heartbeats and other models' requests go on meanwhile
            with self._lock:
                engine = self._engines.get(base_model)
                if engine is not None:
                    self._users[base_model] = self._users.get(base_model, 0) + 1
                    return engine
                evicted = self._make_room(base_model)
                self._loads_in_progress += 1
            try:
                for old in evicted:
                    old.close()
                log.info("loading base model %s", base_model)
                started = time.monotonic()
                engine = self._engine_factory(base_model)
            finally:
                with self._lock:
                    self._loads_in_progress -= 1
            with self._lock:
                loads = self._loads.setdefault(base_model, {"count": 0, "seconds": 0.0})
                loads["count"] += 1
                loads["seconds"] = round(time.monotonic() - started, 3)
                self._engines[base_model] = engine
                self._users[base_model] = self._users.get(base_model, 0) + 1
            return engine

    def _load_engine(self, base_model: str) -> InferenceEngine:
        return InferenceEngine(
            self.model_dir(base_model),
            max_batch_size=self.settings.max_batch_size,
            max_adapters=self.settings.max_adapters,
            device=self.settings.device or None,
            decode=self.settings.decode,
            static_max_len=self.settings.static_max_len,
        )

    def _make_room(self, base_model: str) -> list[InferenceEngine]:
        """Under the lock: take idle engines out until a new one fits (loads in progress count too)."""
        evicted = []
        while len(self._engines) + self._loads_in_progress >= self.settings.max_base_models:
            idle = [name for name in self._engines if not self._busy(name)]
            if not idle:
                raise WorkerBusy("this worker's engines are busy with other base models")
            log.info("unloading base model %s to make room for %s", idle[0], base_model)
            evicted.append(self._engines.pop(idle[0]))
        return evicted

    def _busy(self, base_model: str) -> bool:
        """Under the lock: a request holds the engine, or the engine has work in flight."""
        if self._users.get(base_model, 0) > 0:
            return True
        stats = self._engines[base_model].stats()
        return bool(stats.get("running") or stats.get("waiting"))

    def adapter_dir(self, adapter: str, prefix: str) -> Path:
        """The adapter's files in the local cache, fetched from storage the first time."""

        def fetch(partial: Path) -> None:
            partial.mkdir(parents=True)
            storage = get_storage()
            for name in ADAPTER_FILES:
                storage.download(f"{prefix}/{name}", partial / name)

        return self._fetched(adapter, self._cache_path(adapter), fetch)

    def model_dir(self, base_model: str) -> str:
        """Where the weights of `base_model` load from: itself (a local directory or Hub id), or for a run's
        stored weights (a full fine-tune, a merge) a local copy fetched from storage the first time."""
        if not base_model.startswith(STORED_MODEL):
            return base_model
        prefix = base_model.removeprefix(STORED_MODEL)
        target = self.cache_dir / "models" / hashlib.sha256(prefix.encode()).hexdigest()[:24]
        return str(self._fetched(base_model, target, lambda partial: download_prefix(get_storage(), prefix, partial)))

    def _fetched(self, key: str, target: Path, fetch: Callable[[Path], None]) -> Path:
        """`target`, filled once by `fetch` into a partial directory renamed when complete: a crash mid-download
        leaves no half copy that looks whole. One fetch per `key` at a time."""
        with self._lock:
            lock = self._adapter_locks.setdefault(key, threading.Lock())
        with lock:
            if not (target / ".complete").exists():
                partial = target.with_name(f"{target.name}.partial")
                shutil.rmtree(partial, ignore_errors=True)
                fetch(partial)
                (partial / ".complete").touch()
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
        return target

    def _cache_path(self, adapter: str) -> Path:
        """Adapter names are deployment ids; anything else must never become a path (let alone an rmtree)."""
        if not ADAPTER_NAME.match(adapter):
            raise ValueError(f"not an adapter name: {adapter!r}")
        return self.cache_dir / adapter

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def unload(self, target: str) -> bool:
        """Unload a base model (its engine, once idle) or an adapter (by name) wherever it is loaded.
        False means "not yet": the engine or adapter is in use, so the caller retries later."""
        with self._lock:
            if self._loading.get(target, threading.Lock()).locked():
                return False  # still loading: unload it once it is there
            engine = self._engines.get(target)
            if engine is not None:
                if self._busy(target):
                    return False
                del self._engines[target]
            engines = list(self._engines.values())
        if engine is not None:
            engine.close()
            return True
        if not ADAPTER_NAME.match(target):
            return True  # a base model this worker does not hold: nothing to do
        done = True
        for engine in engines:
            if target in engine.stats().get("loaded_adapters", []):
                try:
                    engine.unload_adapter(target)
                except AdapterError as exc:  # in use by a running request
                    log.info("adapter %s busy, unloading later: %s", target, exc)
                    done = False
        if done:
            shutil.rmtree(self._cache_path(target), ignore_errors=True)
        return done

    def stats(self) -> dict[str, Any]:
        with self._lock:
            engines = dict(self._engines)
            in_flight = self._in_flight
            loading = [name for name, lock in self._loading.items() if lock.locked() and name not in engines]
        models = {base: {**engine.stats(), **engine.info()} for base, engine in engines.items()}
        with self._lock:
            loads = {model: dict(counts) for model, counts in self._loads.items()}
        return {
            "requests_in_flight": in_flight,
            "concurrency": self.settings.concurrency,
            "models": models,
            "loading": loading,
            "loads": loads,  # per base model: {"count": times loaded, "seconds": the last load}
            "max_base_models": self.settings.max_base_models,
            "device": self.settings.device or "auto",
            "queue": worker_queue(self.name),
        }

    # ---------------------------------------------------------------- heartbeat

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self._report()
            except Exception:  # a database blip must not kill the heartbeat
                log.exception("inference heartbeat failed")
            try:
                self._apply_commands()
            except Exception:
                log.exception("applying inference commands failed")
            try:
                self._follow_placement()
            except Exception:
                log.exception("following the model placement failed")

    def _follow_placement(self) -> None:
        """Hold what the API placed on this worker: load placed models ahead of their requests, mark them
        ready once loaded, and unload (when idle) models no longer placed here."""
        with self._lock:
            loaded = set(self._engines)
            loads = {model: counts["seconds"] for model, counts in self._loads.items()}
        with session_scope() as session:
            rows = session.exec(select(ModelPlacement).where(ModelPlacement.worker == self.name)).all()
            placed = {row.base_model for row in rows}
            for row in rows:
                if row.base_model in loaded and row.state != PlacementState.ready:
                    row.state, row.ready_at, row.load_seconds = (
                        PlacementState.ready,
                        utcnow(),
                        loads.get(row.base_model),
                    )
                    session.add(row)
            session.commit()
        room = self.settings.max_base_models - len(loaded)
        for model in sorted(placed - loaded)[: max(0, room)]:  # over capacity: loaded by requests, not ahead
            self._preload(model)
        if self.settings.routing != "placed":
            return  # any worker serves any model: what it holds is its LRU's business
        for model in loaded - placed:
            if self.unload(model):
                log.info("unloaded base model %s: no longer placed on this worker", model)

    def _preload(self, base_model: str) -> None:
        with self._lock:
            if base_model in self._preloading:
                return
            self._preloading.add(base_model)

        def load() -> None:
            try:
                with self.using(base_model):
                    pass
            except Exception:  # busy with another model, or the weights failed: the next heartbeat retries
                log.warning("preloading %s failed", base_model, exc_info=True)
            finally:
                with self._lock:
                    self._preloading.discard(base_model)

        threading.Thread(target=load, name=f"preload-{base_model[-40:]}", daemon=True).start()

    def _report(self) -> None:
        stats = self.stats()
        with session_scope() as session:
            row = session.get(InferenceWorker, self.name) or InferenceWorker(
                name=self.name, hostname=socket.gethostname(), pid=os.getpid()
            )
            row.heartbeat_at = utcnow()
            row.stats = stats
            session.add(row)
            session.commit()

    def _apply_commands(self) -> None:
        with session_scope() as session:
            commands = session.exec(
                select(InferenceCommand)
                .where(col(InferenceCommand.id) > self._last_command)
                .order_by(col(InferenceCommand.id))
            ).all()
            new = [(c.id or 0, c.target) for c in commands if c.action == "unload"]
            if commands:
                self._last_command = commands[-1].id or self._last_command
        still_pending = []
        for command_id, target in self._pending + new:
            try:
                done = self.unload(target)
            except Exception:  # keep it, and the others: the next heartbeat tries again
                log.exception("unloading %s failed", target)
                done = False
            if done:
                log.info("admin command %s: unloaded %s", command_id, target)
            else:
                still_pending.append((command_id, target))
        self._pending = still_pending


_manager: EngineManager | None = None
_manager_lock = threading.Lock()


def get_manager(settings: Settings, worker_name: str) -> EngineManager:
    global _manager
    with _manager_lock:
        if _manager is None:
            manager = EngineManager(settings, worker_name)
            manager.start()  # if this fails (database down), the next request tries again
            _manager = manager
        return _manager


def shutdown_manager() -> None:
    global _manager
    with _manager_lock:
        if _manager is not None:
            _manager.close()
            _manager = None
