"""The API's side of a generation: send it to the inference queue, then follow the worker's replies.

A request never hangs: no worker takes it within ``inference.queue_timeout_s`` → 503 (and the
message expires, so no worker runs it later for nobody); the worker that took it stops heartbeating
→ 502; it runs past ``inference.request_timeout_s`` → 504.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
from fastapi.concurrency import run_in_threadpool
from sqlmodel import col, select

from app.core.config import Settings
from app.core.db import session_scope
from app.core.relay import celery_send
from app.core.replies import Reply, reply_channel
from app.models import Deployment, InferenceWorker, utcnow

GENERATE_TASK = "studio.generate"
SCORE_TASK = "studio.score"
INFERENCE_QUEUE = "inference"
READ_WAIT_S = 1.0
CLEANUP_S = 5.0
log = logging.getLogger(__name__)


class InferenceFailed(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def target(deployment: Deployment) -> dict[str, Any]:
    """What a worker needs to know about the model: base weights and the adapter, if any."""
    return {"base_model": deployment.base_model,
            "adapter": str(deployment.id) if deployment.adapter_prefix else None,
            "adapter_prefix": deployment.adapter_prefix}  # fmt: skip


def new_request_id() -> str:
    return uuid.uuid4().hex


async def replies(
    settings: Settings, task: str, payload: dict[str, Any], gone: Callable[[], Awaitable[bool]] | None = None
) -> AsyncGenerator[Reply, None]:
    """Send, then yield the worker's replies until ``done``; raise InferenceFailed on any failure.
    ``gone`` tells whether the client disconnected; then the worker is told to stop."""
    limits = settings.inference
    rid = payload["request_id"]
    channel = reply_channel()
    if not await run_in_threadpool(live_workers, limits.worker_stale_after_s):
        raise InferenceFailed(503, "no_worker", "no inference worker is running; start one with "
                              "`studio worker --queue inference`")  # fmt: skip
    # Expires with the queue timeout: a request nobody took in time is never run for nobody later.
    await run_in_threadpool(partial(celery_send, task, INFERENCE_QUEUE, {"request": payload},
                                    expires=limits.queue_timeout_s))  # fmt: skip
    start = last_check = time.monotonic()
    after, worker, finished = "0", None, False
    try:
        while True:
            got = await channel.read(rid, after, READ_WAIT_S)
            for reply_id, reply in got:
                after = reply_id
                if reply["type"] == "accepted":
                    worker = reply["worker"]
                elif reply["type"] == "error":
                    finished = True
                    raise InferenceFailed(reply["status"], reply["code"], reply["message"], reply.get("param"))
                else:
                    finished = reply["type"] == "done"
                    yield reply
                    if finished:
                        return
            now = time.monotonic()
            if not got and gone is not None and await gone():
                return  # finally: cancel
            if worker is None and now - start > limits.queue_timeout_s:
                raise InferenceFailed(503, "no_worker", f"no inference worker took the request within "
                                      f"{limits.queue_timeout_s:.0f} s")  # fmt: skip
            if now - start > limits.request_timeout_s:
                raise InferenceFailed(504, "timeout", f"generation took longer than {limits.request_timeout_s:.0f} s")
            if worker is not None and not got and now - last_check >= READ_WAIT_S:
                last_check = now
                if not await run_in_threadpool(worker_alive, worker, limits.worker_stale_after_s):
                    raise InferenceFailed(502, "worker_lost", f"inference worker {worker} was lost during the request")
    finally:
        if not finished:  # the client left, or we gave up: the worker stops generating for nobody
            await cleanup(channel.cancel(rid), f"cancelling {rid}")
        await cleanup(channel.discard(rid), f"discarding the replies of {rid}")


async def cleanup(step: Awaitable[Any], what: str) -> None:
    """Run a cleanup step even when the request was cancelled (client gone), for at most CLEANUP_S, and
    never let its failure hide the answer or skip the next step: it is logged."""
    with anyio.move_on_after(CLEANUP_S, shield=True) as scope:
        try:
            await step
        except Exception:
            log.exception("%s failed", what)
    if scope.cancelled_caught:
        log.warning("%s took longer than %s s; given up", what, CLEANUP_S)


async def run_to_end(
    settings: Settings, task: str, payload: dict[str, Any], gone: Callable[[], Awaitable[bool]] | None = None
) -> Reply:
    """The ``done`` reply of a request (deltas skipped)."""
    async for reply in replies(settings, task, payload, gone):
        if reply["type"] == "done":
            return reply
    raise InferenceFailed(499, "client_gone", "the client went away before the answer")


def worker_alive(name: str, stale_after_s: float) -> bool:
    with session_scope() as session:
        row = session.get(InferenceWorker, name)
        return row is not None and row.heartbeat_at > utcnow() - timedelta(seconds=stale_after_s)


def live_workers(stale_after_s: float) -> list[InferenceWorker]:
    with session_scope() as session:
        fresh = col(InferenceWorker.heartbeat_at) > utcnow() - timedelta(seconds=stale_after_s)
        rows = session.exec(select(InferenceWorker).where(fresh).order_by(col(InferenceWorker.name))).all()
        for row in rows:
            session.expunge(row)
        return list(rows)
