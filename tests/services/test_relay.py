"""The API's relay loop (app/services/relay.py): a committed outbox row is sent as soon as a route wakes
the loop, not on its next tick; the loop survives a failing pass and stops when asked.

Fast: the loop runs as a thread in this process with a fake sender instead of Celery.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.outbox import enqueue
from app.services import relay as relay_module
from app.services.relay import OutboxRelay
from tests.fast_rows import outbox_rows

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("db")]

TICK_S = 60.0  # so long that anything sent within the test was sent because of wake()


class Recorder:
    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.sent: list[dict[str, Any]] = []
        self.failures = 0
        self.got = threading.Event()

    def __call__(self, task_name: str, queue: str, kwargs: dict[str, Any], **options: Any) -> None:
        if queue != self.queue:
            return  # another test's leftover row: sent nowhere
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.sent.append(kwargs)
        self.got.set()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder(f"test.relay-{secrets.token_hex(4)}")
    monkeypatch.setattr(relay_module, "celery_send", rec)
    return rec


@pytest.fixture
def relay(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> Iterator[OutboxRelay]:
    first_pass = threading.Event()
    requeue_stale = relay_module.requeue_stale

    def reap_then_tell(**kwargs: Any) -> Any:  # the real reaper; it ends each pass that reaps
        try:
            return requeue_stale(**kwargs)
        finally:
            first_pass.set()

    monkeypatch.setattr(relay_module, "requeue_stale", reap_then_tell)
    settings = get_settings()
    api = settings.api.model_copy(update={"relay_interval_s": TICK_S})
    loop = OutboxRelay(settings.model_copy(update={"api": api}))
    loop.start()
    assert first_pass.wait(10), "the relay's first pass did not finish"  # later passes come from wake() only
    yield loop
    loop.stop()
    assert not loop._thread.is_alive()


def _commit(queue: str, payload: dict[str, Any]) -> None:
    with session_scope() as session:
        enqueue(session=session, task_name="studio.test", queue=queue, payload=payload)
        session.commit()


def test_wake_sends_a_committed_row_at_once(relay: OutboxRelay, recorder: Recorder) -> None:
    _commit(recorder.queue, {"n": 1})
    time.sleep(0.3)
    assert recorder.sent == [], "sent without a wake: the tick is too short for this test to mean anything"

    relay.wake()

    assert recorder.got.wait(10), "the relay did not send after wake()"
    assert recorder.sent == [{"n": 1}]
    _wait_for(lambda: all(row.sent_at is not None for row in outbox_rows(recorder.queue)))


def test_the_loop_keeps_going_after_a_failed_send(relay: OutboxRelay, recorder: Recorder) -> None:
    recorder.failures = 1
    _commit(recorder.queue, {"n": 1})

    relay.wake()
    _wait_for(lambda: outbox_rows(recorder.queue)[0].send_attempts == 1)
    assert recorder.sent == []
    relay.wake()

    assert recorder.got.wait(10), "the relay did not retry the row after a failed send"
    assert recorder.sent == [{"n": 1}]


def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
