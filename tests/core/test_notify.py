"""ChangeWaiter (app/core/notify.py) treats Redis as a hint: unreachable or killed, it never raises into
the stream that waits on it; it polls meanwhile and subscribes again once Redis is back."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import redis

from app.core import notify
from app.core.config import EventsSettings, get_settings
from tests.e2e.conftest import RedisServer
from tests.e2e.stack import free_port

pytestmark = pytest.mark.faults
CHANNEL = "studio:test:notify"


def use_events(monkeypatch: pytest.MonkeyPatch, redis_url: str, poll_s: float) -> None:
    settings = get_settings().model_copy(update={"events": EventsSettings(redis_url=redis_url, poll_interval_s=poll_s)})
    monkeypatch.setattr(notify, "get_settings", lambda: settings)


@pytest.mark.fast
def test_unreachable_redis_falls_back_to_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    use_events(monkeypatch, f"redis://127.0.0.1:{free_port()}/0", poll_s=0.1)  # nothing listens there

    async def scenario() -> float:
        async with notify.ChangeWaiter(CHANNEL) as waiter:
            started = time.monotonic()
            for _ in range(3):
                await waiter.wait()
            assert not waiter.live
            return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert 0.25 <= elapsed < 3, elapsed  # it slept the poll interval each time, and did not hang
    assert notify.retry_ms() == 500  # streams tell clients to reconnect soon (at least half a second)


def test_killed_redis_falls_back_then_live_wakeups_come_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(tmp_path / "redis").start()
    poll_s = 1.0  # a subscribed wait without a message lasts 5 s: much longer than a wake-up
    use_events(monkeypatch, server.url, poll_s)
    monkeypatch.setattr(notify, "RESUBSCRIBE_MAX_S", 2.0)

    async def woken(waiter: notify.ChangeWaiter) -> float:
        """Seconds from a wait's start until it returns after a publish made 0.2 s later (the first
        wait after subscribing may return at once for the subscription's own reply)."""
        published = threading.Event()

        def publish() -> None:
            time.sleep(0.2)
            published.set()  # before: the waiter may wake before publish() returns
            client = redis.Redis.from_url(server.url)
            client.publish(CHANNEL, "changed")
            client.close()

        threading.Thread(target=publish, daemon=True).start()
        started = time.monotonic()
        while not published.is_set():
            await waiter.wait()
        return time.monotonic() - started

    async def scenario() -> None:
        async with notify.ChangeWaiter(CHANNEL) as waiter:
            assert waiter.live
            assert await woken(waiter) < 2
            server.kill()
            for _ in range(3):  # each returns within a poll interval, none raises
                started = time.monotonic()
                await waiter.wait()
                assert time.monotonic() - started < poll_s + 1
            assert not waiter.live
            server.start()
            deadline = time.monotonic() + 15
            while not waiter.live:  # subscribes again after its (bounded) backoff
                assert time.monotonic() < deadline, "never subscribed again"
                await waiter.wait()
            assert await woken(waiter) < 2  # woken by Redis again, not by the 5 s timeout

    try:
        asyncio.run(scenario())
    finally:
        server.kill()
