"""The transactional outbox (app/services/outbox.py): a send leaves only with its committed transaction,
in order, and survives a broker that is down.

Fast: a fake sender stands in for Celery. Other tests may leave unsent rows in a shared database, so each
test sends to a queue of its own and looks only at what reached that queue.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from sqlmodel import Session

from app.core.db import get_engine, session_scope
from app.core.outbox import enqueue, pending_count, relay_once
from tests.fast_rows import outbox_rows

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("db")]


class FakeSender:
    """Records (task, queue, kwargs); raises for this test's queue while ``down``."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.down: Exception | None = None

    def __call__(self, task_name: str, queue: str, kwargs: dict[str, Any]) -> None:
        if queue == self.queue and self.down is not None:
            raise self.down
        self.calls.append((task_name, queue, kwargs))

    @property
    def sent(self) -> list[tuple[str, dict[str, Any]]]:
        return [(task, kwargs) for task, queue, kwargs in self.calls if queue == self.queue]


@pytest.fixture
def queue() -> str:
    return f"test.outbox-{secrets.token_hex(4)}"


def test_committed_rows_are_sent_in_order_and_marked_sent(queue: str) -> None:
    with session_scope() as session:
        for i in range(3):
            enqueue(session=session, task_name="studio.test", queue=queue, payload={"n": i})
        session.commit()
    with session_scope() as session:
        enqueue(session=session, task_name="studio.other", queue=queue, payload={"n": 3})
        session.commit()
    send = FakeSender(queue)

    with session_scope() as session:
        assert relay_once(session=session, send=send) >= 4

    assert send.sent == [
        ("studio.test", {"n": 0}),
        ("studio.test", {"n": 1}),
        ("studio.test", {"n": 2}),
        ("studio.other", {"n": 3}),
    ]
    rows = outbox_rows(queue)
    assert all(row.sent_at is not None and row.send_attempts == 0 for row in rows)
    # A second pass sends nothing again.
    with session_scope() as session:
        relay_once(session=session, send=send)
    assert len(send.sent) == 4


def test_a_failed_send_keeps_the_row_and_a_later_pass_sends_it(queue: str) -> None:
    with session_scope() as session:
        enqueue(session=session, task_name="studio.test", queue=queue, payload={"n": 1})
        enqueue(session=session, task_name="studio.test", queue=queue, payload={"n": 2})
        session.commit()
    send = FakeSender(queue)
    send.down = ConnectionError("broker unreachable: connection refused")

    for _ in range(2):
        with session_scope() as session:
            relay_once(session=session, send=send)

    first, second = outbox_rows(queue)
    assert first.sent_at is None and second.sent_at is None
    assert first.send_attempts == 2
    assert first.last_error == "broker unreachable: connection refused"
    assert second.send_attempts == 0, "a pass stops at the first failure, so rows are not sent out of order"
    assert send.sent == []
    with session_scope() as session:
        assert pending_count(session=session) >= 2

    send.down = None
    with session_scope() as session:
        relay_once(session=session, send=send)

    assert send.sent == [("studio.test", {"n": 1}), ("studio.test", {"n": 2})]
    assert all(row.sent_at is not None for row in outbox_rows(queue))


def test_a_rolled_back_transaction_sends_nothing(queue: str) -> None:
    with session_scope() as session:
        enqueue(session=session, task_name="studio.test", queue=queue, payload={"n": "rolled back"})
        session.flush()  # the row exists inside the transaction...
        session.rollback()  # ...and goes with it
    with pytest.raises(RuntimeError), session_scope() as session:
        enqueue(session=session, task_name="studio.test", queue=queue, payload={"n": "never committed"})
        raise RuntimeError("the request failed before commit")
    send = FakeSender(queue)

    with session_scope() as session:
        relay_once(session=session, send=send)

    assert send.sent == []
    assert outbox_rows(queue) == []


def test_rows_of_an_open_transaction_wait_for_its_commit(queue: str) -> None:
    """The relay runs beside requests: what a request has not committed yet is not sent."""
    with Session(get_engine(), expire_on_commit=False) as request:
        enqueue(session=request, task_name="studio.test", queue=queue, payload={"n": 1})
        request.flush()
        send = FakeSender(queue)
        with session_scope() as relay:
            relay_once(session=relay, send=send)
        assert send.sent == []
        request.commit()
    with session_scope() as relay:
        relay_once(session=relay, send=send)
    assert send.sent == [("studio.test", {"n": 1})]
