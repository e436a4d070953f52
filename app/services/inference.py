"""The API's side of a generation: send it to the queue of a worker its base model is placed on
(`app.services.placement`), then follow the worker's replies.

A request never hangs: no worker takes it within ``inference.queue_timeout_s`` → 503 (and the
message expires, so no worker runs it later for nobody); while it waits to be taken, its worker stops
heartbeating (older than ``inference.worker_stale_after_s``, re-checked every ``CHECK_S``) → 503 at once,
and the next request goes to the model's new placement; the worker that took it stops heartbeating → 502;
it runs past ``inference.request_timeout_s`` → 504.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
from fastapi.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.contracts.inference import (
    Accepted,
    ChatMessage,
    Delta,
    Done,
    Error,
    GenerateMessage,
    ModelTarget,
    Sampling,
    Scored,
    ScoreMessage,
)
from app.core.db import session_scope
from app.core.queues import GENERATE_TASK, INFERENCE_QUEUE, SCORE_TASK
from app.core.replies import reply_channel
from app.models import Deployment, InferenceWorker, utcnow
from app.services import placement
from app.services.fleet import live_inference_workers
from app.services.placement import NoCapacity, Route
from app.services.relay import celery_send

READ_WAIT_S = 1.0
CHECK_S = 1.0  # how often a waiting request re-checks the heartbeats (one short query)
CLEANUP_S = 5.0
log = logging.getLogger(__name__)


class InferenceFailed(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def target(deployment: Deployment) -> ModelTarget:
    """What a worker needs to know about the model: base weights and the adapter, if any."""
    adapter = str(deployment.id) if deployment.adapter_prefix else None
    return ModelTarget(base_model=deployment.base_model, adapter=adapter, adapter_prefix=deployment.adapter_prefix)


def generation(
    deployment: Deployment,
    sampling: Sampling,
    *,
    messages: list[ChatMessage] | None = None,
    prompt: str | None = None,
    stream: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> GenerateMessage:
    """The one builder of a generation message: a chat (``messages``) or a plain ``prompt``. With ``tools``
    the chat template renders them and the answer's tool calls come back parsed."""
    return GenerateMessage(
        **target(deployment).model_dump(),
        **sampling.model_dump(),
        messages=messages,
        prompt=prompt,
        stream=stream,
        tools=tools,
        parse_tool_calls=bool(tools),
    )


def greedy(max_tokens: int) -> Sampling:
    """Deterministic sampling, for comparisons and judges."""
    return Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)


Answer = Delta | Done | Scored


async def replies(
    settings: Settings,
    message: GenerateMessage | ScoreMessage,
    gone: Callable[[], Awaitable[bool]] | None = None,
    first_reply: Callable[[], None] | None = None,
) -> AsyncGenerator[Answer, None]:
    """Send, then yield the worker's replies until ``done``/``scored``; raise InferenceFailed on any failure.
    ``gone`` tells whether the client disconnected; then the worker is told to stop. ``first_reply`` is
    called when the first text (or the whole answer) arrives."""
    limits = settings.inference
    rid = message.request_id
    task = GENERATE_TASK if isinstance(message, GenerateMessage) else SCORE_TASK
    channel = reply_channel()
    placed = await run_in_threadpool(_route, message.base_model, limits.worker_stale_after_s, limits.routing)
    # Expires with the queue timeout: a request nobody took in time is never run for nobody later.
    send = partial(celery_send, task, placed.queue, message.kwargs(), expires=limits.queue_timeout_s)
    await run_in_threadpool(send)
    start = last_check = time.monotonic()
    after, worker, finished = "0", None, False
    try:
        while True:
            got = await channel.read(rid, after, READ_WAIT_S)
            for reply_id, reply in got:
                after = reply_id
                if isinstance(reply, Error):
                    finished = True
                    raise InferenceFailed(reply.status, reply.code, reply.message, reply.param)
                if isinstance(reply, Delta | Done | Scored):
                    finished = not isinstance(reply, Delta)
                    if first_reply is not None:
                        first_reply()
                        first_reply = None
                    yield reply
                    if finished:
                        return
                elif isinstance(reply, Accepted):
                    worker = reply.worker
            now = time.monotonic()
            if not got and gone is not None and await gone():
                return  # finally: cancel
            if worker is None and now - start > limits.queue_timeout_s:
                raise InferenceFailed(
                    503, "no_worker", f"no inference worker took the request within {limits.queue_timeout_s:.0f} s"
                )
            if now - start > limits.request_timeout_s:
                raise InferenceFailed(504, "timeout", f"generation took longer than {limits.request_timeout_s:.0f} s")
            if not got and now - last_check >= CHECK_S:
                last_check = now
                if worker is None:  # not taken yet: is its worker still there? (the message expires anyway)
                    if not await run_in_threadpool(_can_take, placed, limits.worker_stale_after_s):
                        raise InferenceFailed(
                            503,
                            "no_worker",
                            f"inference worker {placed.worker} was lost before it took the request; retry "
                            "(its models are placed on the other workers)",
                        )
                elif not await run_in_threadpool(worker_alive, worker, limits.worker_stale_after_s):
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


async def complete(
    settings: Settings,
    message: GenerateMessage,
    gone: Callable[[], Awaitable[bool]] | None = None,
    first_reply: Callable[[], None] | None = None,
) -> Done:
    """The whole answer of a generation (deltas skipped)."""
    async for reply in replies(settings, message, gone, first_reply):
        if isinstance(reply, Done):
            return reply
    raise InferenceFailed(499, "client_gone", "the client went away before the answer")


async def score(settings: Settings, message: ScoreMessage) -> Scored:
    """The scores of a scoring request."""
    async for reply in replies(settings, message):
        if isinstance(reply, Scored):
            return reply
    raise InferenceFailed(502, "bad_reply", "the worker ended a scoring request without scores")


def _route(base_model: str, stale_after_s: float, routing: str) -> Route:
    if routing == "shared":  # any worker may take it (and load the model: the comparison benchmarks/fleet.py makes)
        if not live_workers(stale_after_s):
            raise InferenceFailed(503, "no_worker", "no inference worker is running; start one")
        return Route(worker="", queue=INFERENCE_QUEUE)
    with session_scope() as session:
        try:
            return placement.route(session, base_model, stale_after_s)
        except NoCapacity as exc:
            raise InferenceFailed(503, "no_worker", str(exc)) from None


def _can_take(placed: Route, stale_after_s: float) -> bool:
    if not placed.worker:
        return bool(live_workers(stale_after_s))
    return worker_alive(placed.worker, stale_after_s)


def worker_alive(name: str, stale_after_s: float) -> bool:
    with session_scope() as session:
        row = session.get(InferenceWorker, name)
        return row is not None and row.heartbeat_at > utcnow() - timedelta(seconds=stale_after_s)


def live_workers(stale_after_s: float) -> list[InferenceWorker]:
    """The live inference workers, read in a session of their own (detached from it)."""
    with session_scope() as session:
        rows = live_inference_workers(session, stale_after_s)
        for row in rows:
            session.expunge(row)
        return list(rows)
