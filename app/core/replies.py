"""Replies from inference workers to the API process waiting on a request: accepted, text deltas,
done or error, in order.

With Redis (production) each request has a stream (``XADD`` by the worker, ``XREAD BLOCK`` by the
API, expiring after ``TTL_S``). Without Redis (the embedded default) replies are rows of
``inference_reply`` that the API polls. Either way the API reads asynchronously, so hundreds of
waiting requests do not hold hundreds of threads.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
from fastapi.concurrency import run_in_threadpool
from sqlmodel import col, delete, select

from app.core.config import get_settings
from app.core.contracts.inference import Cancel, Reply, dump_reply, parse_reply
from app.core.db import session_scope
from app.models import InferenceReply, utcnow

TTL_S = 3600
POLL_S = 0.05


class ReplyChannel(Protocol):
    """Worker side: ``send``, ``cancelled``. API side: ``read``, ``cancel`` (the client went away), ``discard``."""

    def send(self, request_id: str, reply: Reply) -> None: ...

    def cancelled(self, request_id: str) -> bool: ...

    async def read(self, request_id: str, after: str, timeout_s: float) -> list[tuple[str, Reply]]: ...

    async def cancel(self, request_id: str) -> None: ...

    async def discard(self, request_id: str) -> None: ...


def _key(request_id: str) -> str:
    return f"studio:reply:{request_id}"


def _cancel_key(request_id: str) -> str:
    return f"cancel:{request_id}"


class RedisReplies:
    def __init__(self, url: str) -> None:
        self._sync = redis.Redis.from_url(url)
        self._async = aioredis.Redis.from_url(url)

    def send(self, request_id: str, reply: Reply) -> None:
        pipe = self._sync.pipeline()
        pipe.xadd(_key(request_id), {"d": json.dumps(dump_reply(reply))})
        pipe.expire(_key(request_id), TTL_S)
        pipe.execute()

    async def read(self, request_id: str, after: str, timeout_s: float) -> list[tuple[str, Reply]]:
        block_ms = max(1, int(timeout_s * 1000))
        got: Any = await self._async.xread({_key(request_id): after or "0"}, count=256, block=block_ms)
        return [(i.decode(), parse_reply(f[b"d"])) for _, entries in got or [] for i, f in entries]

    def cancelled(self, request_id: str) -> bool:
        return bool(self._sync.exists(f"studio:{_cancel_key(request_id)}"))

    async def cancel(self, request_id: str) -> None:
        await self._async.set(f"studio:{_cancel_key(request_id)}", 1, ex=TTL_S)

    async def discard(self, request_id: str) -> None:
        await self._async.delete(_key(request_id))


class SqlReplies:
    def send(self, request_id: str, reply: Reply) -> None:
        with session_scope() as session:
            session.add(InferenceReply(request_id=request_id, data=dump_reply(reply)))
            session.commit()

    async def read(self, request_id: str, after: str, timeout_s: float) -> list[tuple[str, Reply]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            rows = await run_in_threadpool(self._rows, request_id, int(after or 0))
            if rows or loop.time() >= deadline:
                return rows
            await asyncio.sleep(POLL_S)

    @staticmethod
    def _rows(request_id: str, after: int) -> list[tuple[str, Reply]]:
        with session_scope() as session:
            rows = session.exec(
                select(InferenceReply)
                .where(InferenceReply.request_id == request_id, col(InferenceReply.id) > after)
                .order_by(col(InferenceReply.id))
            ).all()
            return [(str(r.id), parse_reply(r.data)) for r in rows]

    def cancelled(self, request_id: str) -> bool:
        with session_scope() as session:
            query = select(InferenceReply.id).where(InferenceReply.request_id == _cancel_key(request_id))
            return session.exec(query).first() is not None

    async def cancel(self, request_id: str) -> None:
        await run_in_threadpool(self.send, _cancel_key(request_id), Cancel())

    async def discard(self, request_id: str) -> None:
        def run() -> None:
            stale = utcnow() - timedelta(seconds=TTL_S)  # also what nobody collected (cancel marks, lost clients)
            with session_scope() as session:
                session.exec(
                    delete(InferenceReply).where(  # type: ignore[call-overload]
                        (col(InferenceReply.request_id) == request_id) | (col(InferenceReply.created_at) < stale)
                    )
                )
                session.commit()

        await run_in_threadpool(run)


@lru_cache
def reply_channel() -> ReplyChannel:
    url = get_settings().events.redis_url
    return RedisReplies(url) if url else SqlReplies()
