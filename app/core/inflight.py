"""Per-team count of /v1 requests in flight, for the ``max_inflight_requests`` quota.

With Redis the count is shared by every API replica: a sorted set per team of request ids scored by
start time; entries older than the request timeout are dropped, so a crashed API process cannot leak
slots forever. Without Redis (the embedded default, one API process) it is a set in memory.
"""

from __future__ import annotations

import threading
import time
import uuid
from functools import lru_cache
from typing import Protocol

import redis.asyncio as aioredis

from app.core.config import get_settings


class InflightLimiter(Protocol):
    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int) -> bool: ...

    async def release(self, team_id: uuid.UUID, request_id: str) -> None: ...


class RedisLimiter:
    def __init__(self, url: str, ttl_s: float) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self.ttl_s = ttl_s

    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int) -> bool:
        key, now = f"studio:inflight:{team_id}", time.time()
        # Add first, then count: two replicas racing for the last slot cannot both get it.
        pipe = self._redis.pipeline()
        pipe.zremrangebyscore(key, "-inf", now - self.ttl_s)
        pipe.zadd(key, {request_id: now})
        pipe.zcard(key)
        pipe.expire(key, int(self.ttl_s) + 60)
        count = (await pipe.execute())[2]
        if count > limit:
            await self._redis.zrem(key, request_id)
            return False
        return True

    async def release(self, team_id: uuid.UUID, request_id: str) -> None:
        await self._redis.zrem(f"studio:inflight:{team_id}", request_id)


class MemoryLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._teams: dict[uuid.UUID, set[str]] = {}

    async def acquire(self, team_id: uuid.UUID, request_id: str, limit: int) -> bool:
        with self._lock:
            running = self._teams.setdefault(team_id, set())
            if len(running) >= limit:
                return False
            running.add(request_id)
            return True

    async def release(self, team_id: uuid.UUID, request_id: str) -> None:
        with self._lock:
            self._teams.get(team_id, set()).discard(request_id)


@lru_cache
def inflight_limiter() -> InflightLimiter:
    settings = get_settings()
    url = settings.events.redis_url
    return RedisLimiter(url, settings.inference.request_timeout_s) if url else MemoryLimiter()
