"""Per-team count of /v1 requests in flight, for the ``max_inflight_requests`` quota.

With Redis the count is shared by every API replica: a sorted set per team of request ids scored by
start time; entries older than the request timeout are dropped, so a crashed API process cannot leak
slots forever. Without Redis (the embedded default, one API process) it is a set in memory.

A request may hold several slots (an A/B compare holds one per generation it runs at once).
"""

from __future__ import annotations

import threading
import time
import uuid
from functools import lru_cache
from typing import Protocol

import redis.asyncio as aioredis

from app.core.config import get_settings

POOL_CONNECTIONS = 32  # Redis connections per API process for counting in-flight requests
POOL_WAIT_S = 10.0  # how long a check waits for one of them before it fails


class InflightLimiter(Protocol):
    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int, slots: int = 1) -> bool:
        """Take ``slots`` slots for ``request_id`` if the team then has at most ``limit`` in use. Calling it
        again for a request that holds its slots re-checks them against ``limit`` (a lowered quota), and
        gives them up when they no longer fit."""
        ...

    async def release(self, team_id: uuid.UUID, request_id: str) -> None: ...


def _members(request_id: str, slots: int) -> list[str]:
    return [request_id] if slots == 1 else [f"{request_id}:{i}" for i in range(slots)]


class RedisLimiter:
    def __init__(self, url: str, ttl_s: float) -> None:
        # A bounded pool that makes callers wait their turn: a burst of requests (each check is one short
        # pipeline) must queue here for a moment, not fail with "Too many connections" (a 500).
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_S)
        self._redis = aioredis.Redis(connection_pool=pool)
        self.ttl_s = ttl_s
        self._slots: dict[str, int] = {}  # requests holding more than one slot, for release

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

    async def release(self, team_id: uuid.UUID, request_id: str) -> None:
        members = _members(request_id, self._slots.pop(request_id, 1))
        await self._redis.zrem(f"studio:inflight:{team_id}", *members)


class MemoryLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._teams: dict[uuid.UUID, set[str]] = {}
        self._slots: dict[str, int] = {}

    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int, slots: int = 1) -> bool:
        members = _members(request_id, slots)
        with self._lock:
            running = self._teams.setdefault(team_id, set())
            running.difference_update(members)  # a re-check counts this request's own slots once
            if len(running) + len(members) > limit:
                self._slots.pop(request_id, None)
                return False
            running.update(members)
            if slots > 1:
                self._slots[request_id] = slots
            return True

    async def release(self, team_id: uuid.UUID, request_id: str) -> None:
        with self._lock:
            members = _members(request_id, self._slots.pop(request_id, 1))
            self._teams.get(team_id, set()).difference_update(members)


@lru_cache
def inflight_limiter() -> InflightLimiter:
    settings = get_settings()
    url = settings.events.redis_url
    return RedisLimiter(url, settings.inference.request_timeout_s) if url else MemoryLimiter()
