"""What an inference worker process holds: engines by base model (normally one), adapters fetched from
storage, and a heartbeat thread that reports stats to the database and applies admin commands.

Celery runs this worker with a thread pool: every request is a task thread that submits to the shared
engine and waits, so concurrent requests meet in the engine's running batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from app.core.config import Settings
from app.core.db import session_scope
from app.core.storage import get_storage
from app.models import InferenceCommand, InferenceWorker, utcnow
from workers.inference import InferenceEngine
from workers.inference.adapters import AdapterError

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class WorkerBusy(RuntimeError):
    """Every engine slot serves another base model with requests in flight."""


class EngineManager:
    def __init__(self, settings: Settings, worker_name: str) -> None:
        self.settings = settings.inference
        self.name = worker_name
        self.cache_dir = Path(self.settings.cache_dir)
        self._engines: OrderedDict[str, InferenceEngine] = OrderedDict()
        self._lock = threading.Lock()
        self._adapter_locks: dict[str, threading.Lock] = {}
        self._in_flight = 0
        self._last_command = 0
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="inference-heartbeat", daemon=True)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with session_scope() as session:  # commands sent before this worker started are not its business
            self._last_command = session.exec(select(col(InferenceCommand.id)).order_by(
                col(InferenceCommand.id).desc())).first() or 0  # fmt: skip
        self._report()
        self._heartbeat.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
        with session_scope() as session:
            row = session.get(InferenceWorker, self.name)
            if row is not None:
                session.delete(row)
                session.commit()

    # ---------------------------------------------------------------- engines and adapters

    def engine_for(self, base_model: str) -> InferenceEngine:
        with self._lock:
            engine = self._engines.get(base_model)
            if engine is not None:
                self._engines.move_to_end(base_model)
                return engine
            while len(self._engines) >= self.settings.max_base_models:
                idle = [name for name, e in self._engines.items() if not _busy(e)]
                if not idle:
                    raise WorkerBusy("this worker's engines are busy with other base models")
                log.info("unloading base model %s to make room for %s", idle[0], base_model)
                self._engines.pop(idle[0]).close()
            log.info("loading base model %s", base_model)
            engine = InferenceEngine(
                base_model, max_batch_size=self.settings.max_batch_size, max_adapters=self.settings.max_adapters,
                device=self.settings.device or None,
            )  # fmt: skip
            self._engines[base_model] = engine
            return engine

    def adapter_dir(self, adapter: str, prefix: str) -> Path:
        """The adapter's files in the local cache, fetched from storage the first time."""
        target = self.cache_dir / adapter
        with self._lock:
            lock = self._adapter_locks.setdefault(adapter, threading.Lock())
        with lock:
            if (target / ".complete").exists():
                return target
            partial = target.with_name(f"{adapter}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            storage = get_storage()
            for name in ADAPTER_FILES:
                storage.download(f"{prefix}/{name}", partial / name)
            (partial / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            return target

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def unload(self, target: str) -> bool:
        """Unload a base model (its whole engine) or an adapter (by name) wherever it is loaded."""
        with self._lock:
            engine = self._engines.pop(target, None)
            engines = list(self._engines.values())
        if engine is not None:
            engine.close()
            return True
        done = False
        for engine in engines:
            if target in engine.stats().get("loaded_adapters", []):
                try:
                    engine.unload_adapter(target)
                    done = True
                except AdapterError as exc:  # in use: the LRU will let it go once idle
                    log.warning("could not unload adapter %s: %s", target, exc)
        shutil.rmtree(self.cache_dir / target, ignore_errors=True)
        return done

    def stats(self) -> dict[str, Any]:
        with self._lock:
            engines = dict(self._engines)
            in_flight = self._in_flight
        models = {}
        for base, engine in engines.items():
            models[base] = {**engine.stats(), **engine.info()}
        return {"requests_in_flight": in_flight, "concurrency": self.settings.concurrency, "models": models}

    # ---------------------------------------------------------------- heartbeat

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self._apply_commands()
                self._report()
            except Exception:  # a database blip must not kill the heartbeat
                log.exception("inference heartbeat failed")

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
                select(InferenceCommand).where(col(InferenceCommand.id) > self._last_command)
                .order_by(col(InferenceCommand.id))
            ).all()  # fmt: skip
            pending = [(c.id or 0, c.action, c.target) for c in commands]
        for command_id, action, target in pending:
            if action == "unload":
                log.info("admin command %s: unload %s -> %s", command_id, target, self.unload(target))
            self._last_command = command_id


def _busy(engine: InferenceEngine) -> bool:
    stats = engine.stats()
    return bool(stats.get("running") or stats.get("waiting"))


_manager: EngineManager | None = None
_manager_lock = threading.Lock()


def get_manager(settings: Settings, worker_name: str) -> EngineManager:
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = EngineManager(settings, worker_name)
            _manager.start()
        return _manager


def shutdown_manager() -> None:
    global _manager
    with _manager_lock:
        if _manager is not None:
            _manager.close()
            _manager = None
