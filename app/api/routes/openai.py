"""OpenAI-compatible serving: /v1/models, /v1/completions, /v1/chat/completions (with `stream: true` as
SSE chunks). Authenticate with an API key as the OpenAI client's `api_key`; `model` is a deployment
name of the key's team. Errors use OpenAI's shape (see app/api/errors.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import SessionDep, SettingsDep, Viewer
from app.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from app.core.config import Settings
from app.core.inflight import inflight_limiter
from app.core.replies import Reply
from app.models import Deployment, Team
from app.services import deployments
from app.services.inference import (
    GENERATE_TASK,
    InferenceFailed,
    cleanup,
    new_request_id,
    replies,
    run_to_end,
    target,
)
from app.services.teams import quota_limits

# Turns a reply into OpenAI stream chunks; None asks for the chunks that open the stream.
ChunkMaker = Callable[[Reply | None], list[dict[str, Any]]]
router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
def list_models(session: SessionDep, principal: Viewer) -> dict[str, Any]:
    """The team's active deployments, as OpenAI models."""
    rows, _ = deployments.list_deployments(session, principal.team_id, deployments.DeploymentStatus.active)
    team = session.get(Team, principal.team_id)
    owner = team.name if team else "studio"
    return {"object": "list", "data": [{"id": d.name, "object": "model", "created": int(d.created_at.timestamp()),
                                        "owned_by": owner} for d in rows]}  # fmt: skip


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Viewer, body: ChatCompletionRequest
) -> JSONResponse | EventSourceResponse:
    """Chat with a deployment: its chat template is applied on the worker."""
    deployment, limit = await run_in_threadpool(_resolve, session, settings, principal.team_id, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.inference.default_max_tokens
    payload = _payload(settings, deployment, body, max_tokens, messages=messages)
    meta = {"id": f"chatcmpl-{payload['request_id']}", "created": int(time.time()), "model": body.model}

    def respond(done: Reply) -> dict[str, Any]:
        return {**meta, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": done["text"]},
            "finish_reason": done["finish_reason"], "logprobs": None}], "usage": _usage(done)}  # fmt: skip

    chunks = _chat_chunks(meta, body.include_usage)
    return await _answer(request, settings, principal.team_id, limit, payload, chunks, respond)


@router.post("/completions", response_model=None)
async def completions(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Viewer, body: CompletionRequest
) -> JSONResponse | EventSourceResponse:
    """Plain text completion (no chat template)."""
    deployment, limit = await run_in_threadpool(_resolve, session, settings, principal.team_id, body.model)
    payload = _payload(settings, deployment, body, body.max_tokens or 16, prompt=body.text)
    meta = {"id": f"cmpl-{payload['request_id']}", "created": int(time.time()), "model": body.model}
    echo = body.text if body.echo else ""

    def respond(done: Reply) -> dict[str, Any]:
        return {**meta, "object": "text_completion", "choices": [{
            "index": 0, "text": echo + done["text"], "finish_reason": done["finish_reason"], "logprobs": None}],
            "usage": _usage(done)}  # fmt: skip

    chunks = _completion_chunks(meta, body.include_usage, echo)
    return await _answer(request, settings, principal.team_id, limit, payload, chunks, respond)


# ---------------------------------------------------------------- helpers


def _resolve(session: SessionDep, settings: Settings, team_id: uuid.UUID, model: str) -> tuple[Deployment, int]:
    """The deployment behind ``model``, and the team's in-flight request limit."""
    deployment = deployments.by_model_name(session, team_id, model)
    team = session.get(Team, team_id)
    session.close()  # generation can take minutes: do not hold a pooled connection (or a SQLite read) meanwhile
    if deployment is None or team is None:
        raise HTTPException(404, f"model {model!r} does not exist or is not deployed in your team")
    return deployment, quota_limits(team, settings)["max_inflight_requests"]


async def _answer(
    request: Request, settings: Settings, team_id: uuid.UUID, limit: int, payload: dict[str, Any],
    chunks: ChunkMaker, respond: Callable[[Reply], dict[str, Any]],
) -> JSONResponse | EventSourceResponse:  # fmt: skip
    """Hold one of the team's in-flight slots for the whole generation (streamed or not)."""
    limiter, rid = inflight_limiter(), payload["request_id"]
    if not await limiter.acquire(team_id, rid, limit):
        raise InferenceFailed(429, "rate_limit_exceeded", f"your team already has {limit} requests in flight "
                              "(its max_inflight_requests quota); retry when one finishes")  # fmt: skip

    async def release() -> None:
        await cleanup(limiter.release(team_id, rid), f"releasing the in-flight slot of {rid}")

    if payload["stream"]:
        return await _stream(request, settings, payload, chunks, release)
    try:
        done = await run_to_end(settings, GENERATE_TASK, payload, request.is_disconnected)
    finally:
        await release()
    return JSONResponse(respond(done))


def _payload(settings: Settings, deployment: Deployment, body: Any, max_tokens: int, **prompt: Any) -> dict[str, Any]:
    cap = settings.inference.max_tokens_cap
    if max_tokens > cap:
        raise InferenceFailed(400, "invalid_value", f"max_tokens: must be <= {cap}", "max_tokens")
    return {"request_id": new_request_id(), **target(deployment), **prompt, "max_tokens": max_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "stop": body.stops, "seed": body.seed,
            "stream": body.stream, "ignore_eos": body.ignore_eos}  # fmt: skip


def _usage(done: Reply) -> dict[str, int]:
    prompt, completion = int(done["prompt_tokens"]), int(done["completion_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(
    request: Request, settings: Settings, payload: dict[str, Any], make_chunks: ChunkMaker,
    release: Callable[[], Awaitable[None]],
) -> EventSourceResponse:  # fmt: skip
    """Wait for the first reply before answering, so errors found by the worker (a prompt longer than
    the context) are still plain HTTP errors; then stream the rest as OpenAI chunks."""
    started = False

    async def gone_before_start() -> bool:  # once streaming, sse-starlette watches the connection
        return not started and await request.is_disconnected()

    source = replies(settings, GENERATE_TASK, payload, gone_before_start)
    try:
        first = await source.__anext__()
    except BaseException:
        await release()
        raise
    started = True

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            for chunk in make_chunks(None) + make_chunks(first):
                yield ServerSentEvent(data=json.dumps(chunk))
            if first["type"] != "done":
                async for reply in source:
                    for chunk in make_chunks(reply):
                        yield ServerSentEvent(data=json.dumps(chunk))
        except InferenceFailed as exc:  # mid-stream: the OpenAI client raises on an `error` chunk
            yield ServerSentEvent(data=json.dumps({"error": {"message": exc.message, "type": "server_error",
                                                            "param": exc.param, "code": exc.code}}))  # fmt: skip
        finally:
            try:
                await cleanup(source.aclose(), "closing the reply stream")
            finally:
                await release()
        yield ServerSentEvent(data="[DONE]")

    return EventSourceResponse(events(), ping=15)


def _chat_chunks(meta: dict[str, Any], include_usage: bool) -> ChunkMaker:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

    def make(reply: Reply | None) -> list[dict[str, Any]]:
        if reply is None:
            return [chunk({"role": "assistant", "content": ""})]
        if reply["type"] == "delta":
            return [chunk({"content": reply["text"]})]
        out = [chunk({}, reply["finish_reason"])]
        if include_usage:
            out.append({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(reply)})
        return out

    return make


def _completion_chunks(meta: dict[str, Any], include_usage: bool, echo: str) -> ChunkMaker:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {**meta, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

    def make(reply: Reply | None) -> list[dict[str, Any]]:
        if reply is None:
            return [chunk(echo)] if echo else []
        if reply["type"] == "delta":
            return [chunk(reply["text"])]
        out = [chunk("", reply["finish_reason"])]
        if include_usage:
            out.append({**meta, "object": "text_completion", "choices": [], "usage": _usage(reply)})
        return out

    return make
