"""The API's background loop: send outbox rows to the broker, requeue runs whose worker died (within
their attempt budget), and re-send the wake-up of jobs queued too long without a claim.

Runs as a daemon thread in every API process (Postgres row locks let replicas share the work).
Routes call ``wake()`` after a commit so a new job is sent at once instead of on the next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.core import notify
from app.core.config import Settings
from app.core.db import session_scope
from app.core.outbox import relay_once
from app.services import usage
from app.services.experiments import requeue_stale, resend_unclaimed
from app.services.placement import replace_lost

log = logging.getLogger(__name__)
REAP_EVERY_S = 5.0


def celery_send(task_name: str, queue: str, kwargs: dict[str, Any], **options: Any) -> None:
    """Send a task by name (the API never imports task code); the Celery app is built on first use. A queue
    the app does not declare (an inference worker's own queue) is declared as it is sent to."""
    from kombu import Queue

    from app.core.celery_app import celery_app

    target: str | Queue = queue if queue in celery_app.amqp.queues else Queue(queue)
    celery_app.send_task(task_name, kwargs=kwargs, queue=target, **options)


class OutboxRelay:
    def __init__(self, settings: Settings) -> None:
        self.interval = settings.api.relay_interval_s
        self.training = settings.training
        self.inference = settings.inference
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        try:  # what was answered since the last pass still counts
            with session_scope() as session:
                usage.flush(session)
        except Exception:
            log.exception("final usage flush failed")

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        next_reap = 0.0
        while not self._stop.is_set():
            try:
                with session_scope() as session:
                    relay_once(session=session, send=celery_send)
                with session_scope() as session:  # this process's deployment request/token counts
                    usage.flush(session)
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + REAP_EVERY_S
                    self._reap()
            except Exception:  # the loop must survive a database or broker outage
                log.exception("outbox relay pass failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def _reap(self) -> None:
        limits = self.training
        with session_scope() as session:
            lost = requeue_stale(
                session=session,
                stale_after_s=limits.stale_after_s,
                max_attempts=limits.max_attempts,
                backoff_s=limits.requeue_backoff_s,
            )
        for experiment_id, team_id in lost:
            log.warning("experiment %s: its worker stopped heartbeating", experiment_id)
            notify.publish(experiment_id, team_id)
        with session_scope() as session:
            for experiment_id in resend_unclaimed(session=session, resend_after_s=limits.resend_after_s):
                log.warning("experiment %s: queued too long without a claim; its message was sent again", experiment_id)
        with session_scope() as session:  # models of a lost inference worker: placed anew, before a request asks
            if moved := replace_lost(session, self.inference.worker_stale_after_s):
                log.warning("re-placed %d base model(s) of lost inference workers", moved)


_relay: OutboxRelay | None = None


def set_relay(relay: OutboxRelay | None) -> None:
    global _relay
    _relay = relay


def wake_relay() -> None:
    if _relay is not None:
        _relay.wake()
