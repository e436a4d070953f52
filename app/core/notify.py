"""Live notifications through Redis pub/sub. They only say "look again": the database is the truth.

Without ``events.redis_url`` (the embedded default) publishing does nothing and waiters sleep for
the poll interval, so streams still advance by re-reading the database. A Redis that fails or goes away
is treated the same way until it is back: it never ends a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from functools import lru_cache

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from app.core.config import get_settings

log = logging.getLogger(__name__)
RESUBSCRIBE_FIRST_S = 1.0  # after Redis fails, a waiter subscribes again after this, doubling per failure...
RESUBSCRIBE_MAX_S = 30.0  # ...up to this
CONNECT_TIMEOUT_S = 5.0  # connecting and subscribing; also the slack before a silent read counts as lost
_outage_logged = False  # one warning per outage, not one per open stream
_jitter = random.SystemRandom()


def retry_ms() -> int:
    """The ``retry:`` every SSE stream sends first: how soon a client reconnects after a cut (one poll
    interval, at least half a second)."""
    return max(500, round(get_settings().events.poll_interval_s * 1000))


def experiment_channel(experiment_id: uuid.UUID) -> str:
    return f"studio:experiment:{experiment_id}"


def team_channel(team_id: uuid.UUID) -> str:
    return f"studio:team:{team_id}"


@lru_cache
def _client() -> redis.Redis | None:
    url = get_settings().events.redis_url
    return redis.Redis.from_url(url) if url else None


def publish(experiment_id: uuid.UUID, team_id: uuid.UUID) -> None:
    """Wake watchers of the experiment and of its team's channel."""
    client = _client()
    if client is None:
        return
    try:
        client.publish(experiment_channel(experiment_id), "changed")
        client.publish(team_channel(team_id), str(experiment_id))
    except redis.RedisError as exc:  # a lost notification only delays a watcher by one poll
        log.warning("could not publish to redis: %s", exc)


class ChangeWaiter:
    """Wait until something on a channel may have changed: a Redis message, or the poll interval.

    Redis is only a hint, so no Redis error ever reaches the caller: while it is unreachable the waiter
    sleeps the poll interval (the caller re-reads the database anyway) and tries to subscribe again
    after a backoff that doubles up to ``RESUBSCRIBE_MAX_S``, so live wake-ups come back with Redis.
    """

    def __init__(self, channel: str) -> None:
        settings = get_settings().events
        self.poll_s = settings.poll_interval_s
        self.channel = channel
        self._url = settings.redis_url
        self._redis: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._failures = 0  # in a row; sets the backoff
        self._retry_at = 0.0

    @property
    def live(self) -> bool:
        """Subscribed: a publish wakes ``wait`` at once."""
        return self._pubsub is not None

    async def __aenter__(self) -> ChangeWaiter:
        if self._url:
            await self._subscribe()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def wait(self) -> None:
        if self._pubsub is None:
            if self._url and time.monotonic() >= self._retry_at and await self._subscribe():
                return  # subscribed only now: the caller re-reads, so nothing published since its read is missed
            await asyncio.sleep(self.poll_s)
            return
        # Subscribed before the caller's read, so nothing published after that read is missed;
        # the timeout still re-reads now and then in case Redis dropped a message.
        try:
            async with asyncio.timeout(self.poll_s * 5 + CONNECT_TIMEOUT_S):  # a silently dead connection
                await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_s * 5)
        except Exception as exc:  # any failure of the hint: the caller re-reads now, then polls
            await self._lost(exc)
            return
        self._failures = 0

    async def _subscribe(self) -> bool:
        global _outage_logged
        self._redis = aioredis.Redis.from_url(self._url, socket_connect_timeout=CONNECT_TIMEOUT_S)
        self._pubsub = self._redis.pubsub()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._pubsub.subscribe(self.channel)
        except Exception as exc:
            await self._lost(exc)
            return False
        if self._failures and _outage_logged:
            _outage_logged = False
            log.info("live events: redis is reachable again; streams are woken by it again")
        return True

    async def _lost(self, exc: Exception) -> None:
        """Drop the connection, poll meanwhile, and try again after the backoff. Logged once per outage
        (for all streams of the process, not once per stream)."""
        global _outage_logged
        if not _outage_logged:
            _outage_logged = True
            log.warning(
                "live events: redis unavailable (%s: %s); streams re-read the database every %s s until it is back",
                type(exc).__name__,
                exc,
                self.poll_s,
            )
        await self._close()
        backoff = min(RESUBSCRIBE_MAX_S, RESUBSCRIBE_FIRST_S * 2**self._failures)
        self._failures += 1
        # Jitter, so the streams of a process do not all reconnect at the same instant.
        self._retry_at = time.monotonic() + backoff * _jitter.uniform(0.75, 1.0)

    async def _close(self) -> None:
        pubsub, client = self._pubsub, self._redis
        self._pubsub = self._redis = None
        for closing in (pubsub, client):
            if closing is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await closing.aclose()
