"""Reply channels (app/core/replies.py) between an inference worker and the API request waiting on it:
typed replies arrive in order and resume after an id, ``cancel`` is seen by the worker, ``discard`` drops
what is left.

``SqlReplies`` (the embedded default) runs on the ``db`` fixture's database and is fast. ``RedisReplies``
runs only where the full suite has its Redis (STUDIO_TEST_SERVICES=1); ``make test-fast`` skips it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from app.core.contracts.inference import Accepted, Delta, Done, Error, Reply, new_request_id
from app.core.replies import ReplyChannel, SqlReplies
from tests.conftest import IN_PROCESS_REDIS, SERVICES

pytestmark = pytest.mark.fast
T = TypeVar("T")

REPLIES: list[Reply] = [
    Accepted(worker="infer-1@host"),
    Delta(text="Hel"),
    Delta(text="lo"),
    Done(text="Hello", finish_reason="stop", prompt_tokens=3, completion_tokens=2),
]


Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture
def run() -> Iterator[Run[Any]]:
    """One event loop per test, as in an API process (the async Redis client belongs to its loop)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(params=["sql", "redis"])
def channel(request: pytest.FixtureRequest, run: Run[Any]) -> Iterator[ReplyChannel]:
    if request.param == "sql":
        request.getfixturevalue("db")
        yield SqlReplies()
        return
    if not SERVICES:
        pytest.skip("RedisReplies needs the full suite's Redis (STUDIO_TEST_SERVICES=1)")
    import redis

    from app.core.replies import RedisReplies

    try:
        redis.Redis.from_url(IN_PROCESS_REDIS, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {IN_PROCESS_REDIS}")
    replies = RedisReplies(IN_PROCESS_REDIS)
    yield replies
    run(replies._async.aclose())
    replies._sync.close()


def _read(
    run: Run[Any], channel: ReplyChannel, request_id: str, after: str = "", timeout_s: float = 2.0
) -> list[tuple[str, Reply]]:
    replies: list[tuple[str, Reply]] = run(channel.read(request_id, after, timeout_s))
    return replies


def test_replies_arrive_typed_and_in_order(channel: ReplyChannel, run: Run[Any]) -> None:
    request_id = new_request_id()
    for reply in REPLIES:
        channel.send(request_id, reply)

    got = _read(run, channel, request_id)

    assert [reply for _, reply in got] == REPLIES
    assert isinstance(got[-1][1], Done) and got[-1][1].completion_tokens == 2
    assert len({reply_id for reply_id, _ in got}) == len(REPLIES)


def test_read_resumes_after_the_last_id_it_returned(channel: ReplyChannel, run: Run[Any]) -> None:
    request_id = new_request_id()
    channel.send(request_id, REPLIES[0])
    [(first_id, first)] = _read(run, channel, request_id)
    assert first == REPLIES[0]

    for reply in REPLIES[1:]:
        channel.send(request_id, reply)
    rest = _read(run, channel, request_id, after=first_id)

    assert [reply for _, reply in rest] == REPLIES[1:]
    started = time.monotonic()
    assert _read(run, channel, request_id, after=rest[-1][0], timeout_s=0.3) == []
    assert time.monotonic() - started >= 0.25, "an empty read returns only after waiting its timeout"


def test_requests_do_not_see_each_other(channel: ReplyChannel, run: Run[Any]) -> None:
    mine, other = new_request_id(), new_request_id()
    channel.send(other, Error(status=500, code="worker_error", message="for someone else"))
    channel.send(mine, REPLIES[0])

    assert [reply for _, reply in _read(run, channel, mine)] == [REPLIES[0]]


def test_a_waiting_read_returns_when_a_reply_arrives(channel: ReplyChannel, run: Run[Any]) -> None:
    request_id = new_request_id()

    async def wait_then_send() -> tuple[list[tuple[str, Reply]], float]:
        started = time.monotonic()
        reading = asyncio.ensure_future(channel.read(request_id, "", 10.0))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(channel.send, request_id, REPLIES[1])
        return await reading, time.monotonic() - started

    got, waited = run(wait_then_send())

    assert [reply for _, reply in got] == [REPLIES[1]]
    assert waited < 5, "the read waited for its timeout instead of returning on the reply"


def test_cancel_is_seen_by_the_worker(channel: ReplyChannel, run: Run[Any]) -> None:
    request_id = new_request_id()
    assert channel.cancelled(request_id) is False

    run(channel.cancel(request_id))

    assert channel.cancelled(request_id) is True
    assert channel.cancelled(new_request_id()) is False
    assert _read(run, channel, request_id, timeout_s=0.1) == [], "a cancel is not a reply"


def test_discard_removes_the_replies(channel: ReplyChannel, run: Run[Any]) -> None:
    request_id, kept = new_request_id(), new_request_id()
    for reply in REPLIES:
        channel.send(request_id, reply)
    channel.send(kept, REPLIES[0])

    run(channel.discard(request_id))

    assert _read(run, channel, request_id, timeout_s=0.1) == []
    assert [reply for _, reply in _read(run, channel, kept)] == [REPLIES[0]]
