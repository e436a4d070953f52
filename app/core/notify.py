"""Live notifications through Redis pub/sub. They only say "look again": the database is the truth.

Without ``events.redis_url`` (the embedded default) publishing does nothing and waiters sleep for
the poll interval, so streams still advance by re-reading the database.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from functools import lru_cache

import redis
import redis.asyncio as aioredis

from app.core.config import get_settings

log = logging.getLogger(__name__)


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
    """Wait until something on a channel may have changed: a Redis message, or the poll interval."""

    def __init__(self, channel: str) -> None:
        settings = get_settings().events
        self.poll_s = settings.poll_interval_s
        self.channel = channel
        self._redis = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
        self._pubsub = self._redis.pubsub() if self._redis else None

    async def __aenter__(self) -> ChangeWaiter:
        if self._pubsub:
            await self._pubsub.subscribe(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pubsub and self._redis:
            await self._pubsub.aclose()
            await self._redis.aclose()

    async def wait(self) -> None:
        if not self._pubsub:
            await asyncio.sleep(self.poll_s)
            return
        # Subscribed before the caller's read, so nothing published after that read is missed;
        # the timeout still re-reads now and then in case Redis dropped a message.
        await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_s * 5)
