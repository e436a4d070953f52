"""A training worker's row in the registry (`training_worker`): its queues (GPU class), its GPUs and a
heartbeat, so the API can say why a queued job waits (no live worker on its class, or none with enough
GPUs) and `/admin/fleet` can list the fleet. Runs as a thread in the worker's main process."""

from __future__ import annotations

import logging
import os
import socket
import threading

from app.core.db import session_scope
from app.models import TrainingWorker, utcnow

log = logging.getLogger(__name__)


def gpu_slots() -> tuple[str, int]:
    """(the GPU ids this worker owns, how many processes a job may run on it): its pinned GPUs
    (`studio worker --gpus 0,1` sets CUDA_VISIBLE_DEVICES), or on a CPU worker its cores."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if ids:
        return ids, len([i for i in ids.split(",") if i.strip()])
    return "", os.cpu_count() or 1


class TrainingRegistration:
    def __init__(self, name: str, queues: list[str], interval_s: float) -> None:
        self.name, self.queues, self.interval_s = name, queues, interval_s
        self.gpu_ids, self.slots = gpu_slots()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-registration", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        with session_scope() as session:
            row = session.get(TrainingWorker, self.name)
            if row is not None:
                session.delete(row)
                session.commit()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception:  # a database blip must not end the registration
                log.exception("training worker heartbeat failed")

    def _beat(self) -> None:
        with session_scope() as session:
            row = session.get(TrainingWorker, self.name) or TrainingWorker(
                name=self.name, hostname=socket.gethostname(), pid=os.getpid()
            )
            row.queues, row.gpu_ids, row.slots, row.heartbeat_at = self.queues, self.gpu_ids, self.slots, utcnow()
            session.add(row)
            session.commit()
