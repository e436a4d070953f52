"""Per-team count of /v1 requests in flight, for the ``max_inflight_requests`` quota.

With Redis the count is shared by every API replica: a sorted set per team of request ids scored by
start time; entries older than the request timeout are dropped, so a crashed API process cannot leak
slots forever. Without Redis (the embedded default, one API process) it is a set in memory.

A request may hold several slots (an A/B compare holds one per generation it runs at once).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from functools import lru_cache
from typing import Protocol
from weakref import WeakKeyDictionary

import redis.asyncio as aioredis

from app.core.config import get_settings

POOL_CONNECTIONS = 32  # Redis connections per API process for counting in-flight requests
POOL_WAIT_S = 10.0  # how long a check waits for one of them before it fails


class InflightLimiter(Protocol):
    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int, slots: int = 1) -> bool:
        """Take ``slots`` slots for ``request_id`` if the team then has at most ``limit`` in use."""
        ...

    async def recheck(self, team_id: uuid.UUID, request_id: str, limit: int) -> bool:
        """Keep the request's slots only if they are among the team's ``limit`` oldest (a quota found lower
        than the one they were taken under); else give them up. The oldest keep theirs, so a burst taken
        under the old limit is cut down to the new one, not refused whole."""
        ...

    async def release(self, team_id: uuid.UUID, request_id: str) -> None: ...


def _members(request_id: str, slots: int) -> list[str]:
    return [request_id] if slots == 1 else [f"{request_id}:{i}" for i in range(slots)]


class RedisLimiter:
    def __init__(self, url: str, ttl_s: float) -> None:
        self.url, self.ttl_s = url, ttl_s
        self._slots: dict[str, int] = {}  # requests holding more than one slot, for release
        # Asyncio connections belong to the event loop that opened them: one client per loop (the API has
        # one; in-process tests start one per test client).
        self._clients: WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = WeakKeyDictionary()

    @property
    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A bounded pool that makes callers wait their turn: a burst of requests (each check is one
            # short pipeline) queues here for a moment instead of failing with "Too many connections" (500).
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_S
            )
            client = self._clients[loop] = aioredis.Redis(connection_pool=pool)
        return client

    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int, slots: int = 1) -> bool:
        key, now, members = f"studio:inflight:{team_id}", time.time(), _members(request_id, slots)
        # Add first, then count: two replicas racing for the last slot cannot both get it.
        pipe = self._redis.pipeline()
        pipe.zremrangebyscore(key, "-inf", now - self.ttl_s)
        pipe.zadd(key, dict.fromkeys(members, now))
        pipe.zcard(key)
        pipe.expire(key, int(self.ttl_s) + 60)
        count = (await pipe.execute())[2]
        if count > limit:
            await self._redis.zrem(key, *members)
            return False
        if slots > 1:
            self._slots[request_id] = slots
        return True

    async def recheck(self, team_id: uuid.UUID, request_id: str, limit: int) -> bool:
        key, members = f"studio:inflight:{team_id}", _members(request_id, self._slots.get(request_id, 1))
        pipe = self._redis.pipeline()
        for member in members:
            pipe.zrank(key, member)  # by start time
        ranks = await pipe.execute()
        if any(rank is None or rank >= limit for rank in ranks):
            await self.release(team_id, request_id)
            return False
        return True

    async def release(self, team_id: uuid.UUID, request_id: str) -> None:
        members = _members(request_id, self._slots.pop(request_id, 1))
        await self._redis.zrem(f"studio:inflight:{team_id}", *members)


class MemoryLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._teams: dict[uuid.UUID, dict[str, None]] = {}  # in the order taken
        self._slots: dict[str, int] = {}

    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int, slots: int = 1) -> bool:
        members = _members(request_id, slots)
        with self._lock:
            running = self._teams.setdefault(team_id, {})
            if len(running) + len(members) > limit:
                return False
            running.update(dict.fromkeys(members))
            if slots > 1:
                self._slots[request_id] = slots
            return True

    async def recheck(self, team_id: uuid.UUID, request_id: str, limit: int) -> bool:
        with self._lock:
            members = set(_members(request_id, self._slots.get(request_id, 1)))
            oldest = list(self._teams.get(team_id, {}))[:limit]
            if members <= set(oldest):
                return True
        await self.release(team_id, request_id)
        return False

    async def release(self, team_id: uuid.UUID, request_id: str) -> None:
        with self._lock:
            running = self._teams.get(team_id, {})
            for member in _members(request_id, self._slots.pop(request_id, 1)):
                running.pop(member, None)


@lru_cache
def inflight_limiter() -> InflightLimiter:
    settings = get_settings()
    url = settings.events.redis_url
    return RedisLimiter(url, settings.inference.request_timeout_s) if url else MemoryLimiter()
