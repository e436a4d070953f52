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
from app.core.contracts.inference import ChatMessage, Delta, Done, GenerateMessage, Sampling, Scored
from app.core.inflight import inflight_limiter
from app.models import Deployment, DeploymentStatus, Team
from app.services import deployments
from app.services.inference import InferenceFailed, cleanup, complete, generation, replies
from app.services.teams import quota_limits

# Turns a reply into OpenAI stream chunks; None asks for the chunks that open the stream.
ChunkMaker = Callable[[Delta | Done | None], list[dict[str, Any]]]
router = APIRouter(prefix="/v1", tags=["openai"])
MAX_MODELS_LISTED = 1000


@router.get("/models")
def list_models(session: SessionDep, principal: Viewer) -> dict[str, Any]:
    """The team's active deployments, as OpenAI models."""
    rows, _ = deployments.list_deployments(
        session=session, team_id=principal.team_id, status=DeploymentStatus.active, skip=0, limit=MAX_MODELS_LISTED
    )
    team = session.get(Team, principal.team_id)
    owner = team.name if team else "studio"
    return {
        "object": "list",
        "data": [
            {"id": d.name, "object": "model", "created": int(d.created_at.timestamp()), "owned_by": owner} for d in rows
        ],
    }


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Viewer, body: ChatCompletionRequest
) -> JSONResponse | EventSourceResponse:
    """Chat with a deployment: its chat template is applied on the worker."""
    deployment, limit = await run_in_threadpool(_resolve, session, settings, principal.team_id, body.model)
    messages = [ChatMessage(role=m.role, content=m.text()) for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.inference.default_max_tokens
    message = generation(deployment, _sampling(settings, body, max_tokens), messages=messages, stream=body.stream)
    meta = {"id": f"chatcmpl-{message.request_id}", "created": int(time.time()), "model": body.model}

    def respond(done: Done) -> dict[str, Any]:
        answer = {"role": "assistant", "content": done.text}
        choice = {"index": 0, "message": answer, "finish_reason": done.finish_reason, "logprobs": None}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}

    chunks = _chat_chunks(meta, body.include_usage)
    return await _answer(request, settings, principal.team_id, limit, message, chunks, respond)


@router.post("/completions", response_model=None)
async def completions(
    request: Request, session: SessionDep, settings: SettingsDep, principal: Viewer, body: CompletionRequest
) -> JSONResponse | EventSourceResponse:
    """Plain text completion (no chat template)."""
    deployment, limit = await run_in_threadpool(_resolve, session, settings, principal.team_id, body.model)
    sampling = _sampling(settings, body, body.max_tokens or 16)
    message = generation(deployment, sampling, prompt=body.text, stream=body.stream)
    meta = {"id": f"cmpl-{message.request_id}", "created": int(time.time()), "model": body.model}
    echo = body.text if body.echo else ""

    def respond(done: Done) -> dict[str, Any]:
        choice = {"index": 0, "text": echo + done.text, "finish_reason": done.finish_reason, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(done)}

    chunks = _completion_chunks(meta, body.include_usage, echo)
    return await _answer(request, settings, principal.team_id, limit, message, chunks, respond)


# ---------------------------------------------------------------- helpers


def _resolve(session: SessionDep, settings: Settings, team_id: uuid.UUID, model: str) -> tuple[Deployment, int]:
    """The deployment behind ``model``, and the team's in-flight request limit."""
    deployment = deployments.by_model_name(session=session, team_id=team_id, name=model)
    team = session.get(Team, team_id)
    session.close()  # generation can take minutes: do not hold a pooled connection (or a SQLite read) meanwhile
    if deployment is None or team is None:
        raise HTTPException(404, f"model {model!r} does not exist or is not deployed in your team")
    return deployment, quota_limits(team=team, settings=settings)["max_inflight_requests"]


async def _answer(
    request: Request,
    settings: Settings,
    team_id: uuid.UUID,
    limit: int,
    message: GenerateMessage,
    chunks: ChunkMaker,
    respond: Callable[[Done], dict[str, Any]],
) -> JSONResponse | EventSourceResponse:
    """Hold one of the team's in-flight slots for the whole generation (streamed or not)."""
    limiter, rid = inflight_limiter(), message.request_id
    if not await limiter.acquire(team_id, rid, limit):
        raise InferenceFailed(
            429,
            "rate_limit_exceeded",
            f"your team already has {limit} requests in flight "
            "(its max_inflight_requests quota); retry when one finishes",
        )

    async def release() -> None:
        await cleanup(limiter.release(team_id, rid), f"releasing the in-flight slot of {rid}")

    if message.stream:
        return await _stream(request, settings, message, chunks, release)
    try:
        done = await complete(settings, message, request.is_disconnected)
    finally:
        await release()
    return JSONResponse(respond(done))


def _sampling(settings: Settings, body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> Sampling:
    cap = settings.inference.max_tokens_cap
    if max_tokens > cap:
        raise InferenceFailed(400, "invalid_value", f"max_tokens: must be <= {cap}", "max_tokens")
    return Sampling(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def _usage(done: Done) -> dict[str, int]:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}


async def _stream(
    request: Request,
    settings: Settings,
    message: GenerateMessage,
    make_chunks: ChunkMaker,
    release: Callable[[], Awaitable[None]],
) -> EventSourceResponse:
    """Wait for the first reply before answering, so errors found by the worker (a prompt longer than
    the context) are still plain HTTP errors; then stream the rest as OpenAI chunks."""
    started = False

    async def gone_before_start() -> bool:  # once streaming, sse-starlette watches the connection
        return not started and await request.is_disconnected()

    source = replies(settings, message, gone_before_start)
    try:
        first = await source.__anext__()
    except BaseException:
        await release()
        raise
    started = True

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            for chunk in make_chunks(None) + make_chunks(_generated(first)):
                yield ServerSentEvent(data=json.dumps(chunk))
            if isinstance(first, Delta):
                async for reply in source:
                    for chunk in make_chunks(_generated(reply)):
                        yield ServerSentEvent(data=json.dumps(chunk))
        except InferenceFailed as exc:  # mid-stream: the OpenAI client raises on an `error` chunk
            yield ServerSentEvent(
                data=json.dumps(
                    {"error": {"message": exc.message, "type": "server_error", "param": exc.param, "code": exc.code}}
                )
            )
        finally:
            try:
                await cleanup(source.aclose(), "closing the reply stream")
            finally:
                await release()
        yield ServerSentEvent(data="[DONE]")

    return EventSourceResponse(events(), ping=15)


def _generated(reply: Delta | Done | Scored) -> Delta | Done:
    if isinstance(reply, Scored):
        raise InferenceFailed(502, "bad_reply", "the worker answered a generation with scores")
    return reply


def _chat_chunks(meta: dict[str, Any], include_usage: bool) -> ChunkMaker:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def make(reply: Delta | Done | None) -> list[dict[str, Any]]:
        if reply is None:
            return [chunk({"role": "assistant", "content": ""})]
        if isinstance(reply, Delta):
            return [chunk({"content": reply.text})]
        out = [chunk({}, reply.finish_reason)]
        if include_usage:
            out.append({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(reply)})
        return out

    return make


def _completion_chunks(meta: dict[str, Any], include_usage: bool, echo: str) -> ChunkMaker:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            **meta,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }

    def make(reply: Delta | Done | None) -> list[dict[str, Any]]:
        if reply is None:
            return [chunk(echo)] if echo else []
        if isinstance(reply, Delta):
            return [chunk(reply.text)]
        out = [chunk("", reply.finish_reason)]
        if include_usage:
            out.append({**meta, "object": "text_completion", "choices": [], "usage": _usage(reply)})
        return out

    return make
