"""OpenAI-compatible serving: /v1/models, /v1/completions, /v1/chat/completions (with `stream: true` as
SSE chunks). Authenticate with an API key as the OpenAI client's `api_key`; `model` is a deployment
name of the key's team. Errors use OpenAI's shape (see app/api/errors.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlmodel import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import SessionDep, SettingsDep, Viewer
from app.api.limits import reject_unstorable_text
from app.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from app.api.openai_schemas import ChatMessage as OpenAIChatMessage
from app.api.responses import OPENAI_ERRORS
from app.core.config import Settings
from app.core.contracts.grammar import GrammarError, json_schema_grammar
from app.core.contracts.inference import ChatMessage, Delta, Done, GenerateMessage, Sampling, Scored, new_request_id
from app.core.db import session_scope
from app.core.inflight import inflight_limiter
from app.core.metrics import FIRST_TOKEN_SECONDS, INFERENCE_REQUESTS, INFERENCE_TOKENS, REQUEST_SECONDS
from app.core.storage import get_storage
from app.models import Deployment, DeploymentStatus, Team
from app.services import deployments, fine_tuning, usage
from app.services.inference import InferenceFailed, cleanup, complete, generation, replies
from app.services.principal import Principal
from app.services.teams import quota_limits

# Turns a reply of choice `index` into OpenAI stream chunks; None asks for the chunks that open its stream.
ChunkMaker = Callable[[int, Delta | Done | None], list[dict[str, Any]]]
router = APIRouter(
    prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS, dependencies=[Depends(reject_unstorable_text)]
)
MAX_MODELS_LISTED = 1000


@router.get("/models")
def list_models(session: SessionDep, principal: Viewer) -> dict[str, Any]:
    """The team's active deployments, as OpenAI models."""
    rows, _ = deployments.list_deployments(
        session=session, team_id=principal.team_id, status=DeploymentStatus.active, skip=0, limit=MAX_MODELS_LISTED
    )
    owner = _owner(session, principal.team_id)
    return {"object": "list", "data": [_model(d, owner) for d in rows]}


@router.get("/models/{model_id}")
def retrieve_model(model_id: str, session: SessionDep, principal: Viewer) -> dict[str, Any]:
    """One of the team's active deployments, as an OpenAI model; 404 `model_not_found` otherwise."""
    deployment = deployments.by_model_name(session=session, team_id=principal.team_id, name=model_id)
    if deployment is None:
        raise HTTPException(404, f"model {model_id!r} does not exist or is not deployed in your team")
    return _model(deployment, _owner(session, principal.team_id))


def _owner(session: Session, team_id: uuid.UUID) -> str:
    team = session.get(Team, team_id)
    return team.name if team else "studio"


def _model(deployment: Deployment, owner: str) -> dict[str, Any]:
    return {
        "id": deployment.name,
        "object": "model",
        "created": int(deployment.created_at.timestamp()),
        "owned_by": owner,
    }


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, settings: SettingsDep, principal: Viewer, body: ChatCompletionRequest
) -> JSONResponse | EventSourceResponse:
    """Chat with a deployment: its chat template is applied on the worker."""
    _check_size(settings, "messages", body.prompt_chars, len(body.messages))
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.inference.default_max_tokens
    sampling = _sampling(settings, body, max_tokens, logprobs=body.logprobs)
    if body.response_format is not None and (schema := body.response_format.schema_to_follow) is not None:
        sampling.grammar = await run_in_threadpool(_grammar, schema, "response_format")
    if (call_schema := body.tool_call_schema()) is not None:  # required, or a named function: one call, enforced
        sampling.grammar = await run_in_threadpool(_grammar, call_schema, "tools")
    messages = [_turn(m) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.calls_tools else None
    slot = await Slot.take(settings, principal.team_id)
    try:
        deployment = await slot.resolve(settings, principal, body.model)
        batch = [
            generation(deployment, s, messages=messages, stream=body.stream, tools=tools)
            for s in _samples(sampling, body.n)
        ]
    except BaseException:
        await slot.release()
        raise
    meta = {"id": f"chatcmpl-{batch[0].request_id}", "created": int(time.time()), "model": body.model}

    def choice(index: int, done: Done) -> dict[str, Any]:
        answer: dict[str, Any] = {"role": "assistant", "content": done.text}
        if done.tool_calls:
            calls = done.tool_calls if body.parallel_tool_calls is not False else done.tool_calls[:1]
            answer = {"role": "assistant", "content": done.text or None, "tool_calls": calls}
        logprobs = None
        if done.logprobs is not None:
            logprobs = {"content": [entry.model_dump() for entry in done.logprobs], "refusal": None}
        return {"index": index, "message": answer, "finish_reason": done.finish_reason, "logprobs": logprobs}

    reply = Reply(meta, "chat.completion", choice, _chat_chunks(meta), body.include_usage, str(deployment.id))
    return await _answer(request, settings, slot, batch, reply)


@router.post("/completions", response_model=None)
async def completions(
    request: Request, settings: SettingsDep, principal: Viewer, body: CompletionRequest
) -> JSONResponse | EventSourceResponse:
    """Plain text completion (no chat template)."""
    _check_size(settings, "prompt", len(body.text), 1)
    sampling = _sampling(settings, body, body.max_tokens or 16, logprobs=body.logprobs is not None)
    slot = await Slot.take(settings, principal.team_id)
    try:
        deployment = await slot.resolve(settings, principal, body.model)
        batch = [generation(deployment, s, prompt=body.text, stream=body.stream) for s in _samples(sampling, body.n)]
    except BaseException:
        await slot.release()
        raise
    meta = {"id": f"cmpl-{batch[0].request_id}", "created": int(time.time()), "model": body.model}
    echo = body.text if body.echo else ""

    def choice(index: int, done: Done) -> dict[str, Any]:
        logprobs = _completion_logprobs(done, len(echo)) if done.logprobs is not None else None
        return {"index": index, "text": echo + done.text, "finish_reason": done.finish_reason, "logprobs": logprobs}

    reply = Reply(
        meta, "text_completion", choice, _completion_chunks(meta, echo), body.include_usage, str(deployment.id)
    )
    return await _answer(request, settings, slot, batch, reply)


def _grammar(schema: dict[str, Any], param: str) -> str:
    try:
        return json_schema_grammar(schema)
    except GrammarError as exc:
        raise InferenceFailed(400, "invalid_value", f"{param}: {exc}", param) from None


def _turn(message: OpenAIChatMessage) -> ChatMessage:
    """A message as the worker's chat template reads it: tool call arguments as objects, not JSON strings."""
    calls = None
    if message.tool_calls:
        calls = [
            {
                "type": "function",
                "id": c.id,
                "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
            }
            for c in message.tool_calls
        ]
    return ChatMessage(role=message.role, content=message.text(), tool_calls=calls, tool_call_id=message.tool_call_id)


def _samples(sampling: Sampling, n: int) -> list[Sampling]:
    """One generation per choice, all on the continuous batch together. With a seed, choice i samples
    with seed + i, so the n choices differ from each other and each is reproducible."""
    if sampling.seed is None:
        return [sampling] * n
    return [sampling.model_copy(update={"seed": sampling.seed + i}) for i in range(n)]


@dataclass(frozen=True)
class Reply:
    """How the answers of one request become OpenAI's response: the whole body, or stream chunks."""

    meta: dict[str, Any]
    kind: str  # the response's `object`
    choice: Callable[[int, Done], dict[str, Any]]  # one finished choice
    chunks: ChunkMaker  # stream chunks of one choice
    include_usage: bool  # stream: a last chunk with the usage of all choices
    deployment: str  # the metrics label: the deployment's id (never a team's names)
    started: float = field(default_factory=time.monotonic)
    _first: list[bool] = field(default_factory=list)

    def first_reply(self) -> None:
        """The first reply of any choice reached the API: time to first token."""
        if not self._first:
            self._first.append(True)
            FIRST_TOKEN_SECONDS.labels(self.deployment).observe(time.monotonic() - self.started)

    def finished(self, dones: list[Done] | None, outcome: str = "ok") -> None:
        INFERENCE_REQUESTS.labels(self.deployment, outcome).inc()
        tokens = _usage(dones) if dones else {"prompt_tokens": 0, "completion_tokens": 0}
        if dones:
            REQUEST_SECONDS.labels(self.deployment).observe(time.monotonic() - self.started)
            INFERENCE_TOKENS.labels(self.deployment, "prompt").inc(tokens["prompt_tokens"])
            INFERENCE_TOKENS.labels(self.deployment, "completion").inc(tokens["completion_tokens"])
        usage.record(
            uuid.UUID(self.deployment),
            ok=outcome == "ok",
            prompt_tokens=tokens["prompt_tokens"],
            completion_tokens=tokens["completion_tokens"],
        )

    def body(self, dones: list[Done]) -> dict[str, Any]:
        choices = [self.choice(i, done) for i, done in enumerate(dones)]
        return {**self.meta, "object": self.kind, "choices": choices, "usage": _usage(dones)}

    def usage_chunk(self, dones: list[Done]) -> dict[str, Any]:
        chunk_kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        return {**self.meta, "object": chunk_kind, "choices": [], "usage": _usage(dones)}


# ---------------------------------------------------------------- in-flight slots
#
# A /v1 request takes its team's in-flight slot before any database work of its own (only resolving the
# caller comes first), so a burst of one team's requests is refused at the quota instead of queueing for
# database connections that every team's requests need. The slot's limit is the team's quota, which is a
# database row; reading it per request would be the very work the slot is there to bound. So each API
# process remembers each team's limit for TEAM_LIMIT_TTL_S (a miss is read once per team, whoever else
# misses meanwhile waits for that read). The deployment lookup after the slot reads the team row anyway
# (one query, the connection returned at once): it refreshes the remembered limit, and a limit lower
# than the one the slot was taken under re-checks the slot on the spot (the team's oldest requests keep
# theirs). So a lowered quota holds from the request after the change; a raised one, for a team refused
# at its old limit, within the TTL.
TEAM_LIMIT_TTL_S = 5.0


class TeamLimits:
    """Each team's ``max_inflight_requests`` as last read, per API process (see above)."""

    def __init__(self) -> None:
        self._known: dict[uuid.UUID, tuple[float, int]] = {}  # team: (good until, limit)
        self._reads: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[uuid.UUID, asyncio.Future[int]]] = (
            WeakKeyDictionary()
        )

    def remember(self, team_id: uuid.UUID, limit: int) -> None:
        self._known[team_id] = (time.monotonic() + TEAM_LIMIT_TTL_S, limit)

    async def get(self, settings: Settings, team_id: uuid.UUID) -> int:
        known = self._known.get(team_id)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        reads = self._reads.setdefault(asyncio.get_running_loop(), {})
        read = reads.get(team_id)
        if read is None:  # the first to miss reads; the others wait for its answer
            read = reads[team_id] = asyncio.ensure_future(run_in_threadpool(_read_team_limit, settings, team_id))
            read.add_done_callback(lambda _: reads.pop(team_id, None))
        limit = await asyncio.shield(read)  # one waiter leaving (client gone) does not cancel the read
        self.remember(team_id, limit)
        return limit


team_limits = TeamLimits()


class Slot:
    """One /v1 request's in-flight slot: taken first, released once (by whoever ends the request)."""

    def __init__(self, team_id: uuid.UUID, limit: int) -> None:
        self.team_id, self.limit, self.id = team_id, limit, new_request_id()
        self._released = False

    @classmethod
    async def take(cls, settings: Settings, team_id: uuid.UUID) -> Slot:
        slot = cls(team_id, await team_limits.get(settings, team_id))
        if not await inflight_limiter().acquire(team_id, slot.id, slot.limit):
            raise _quota_exceeded(slot.limit)
        return slot

    async def resolve(self, settings: Settings, principal: Principal, model: str) -> Deployment:
        """The deployment behind ``model``; re-checks the slot when the team's quota turns out lower."""
        deployment, limit = await run_in_threadpool(_resolve, settings, principal, model)
        team_limits.remember(self.team_id, limit)
        if limit < self.limit:
            self.limit = limit
            if not await inflight_limiter().recheck(self.team_id, self.id, limit):
                self._released = True  # the re-check gave the slot up
                raise _quota_exceeded(limit)
        if deployment is None:
            raise HTTPException(404, f"model {model!r} does not exist or is not deployed in your team")
        return deployment

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await cleanup(inflight_limiter().release(self.team_id, self.id), f"releasing the in-flight slot {self.id}")


def _quota_exceeded(limit: int) -> InferenceFailed:
    return InferenceFailed(
        429,
        "rate_limit_exceeded",
        f"your team already has {limit} requests in flight (its max_inflight_requests quota); retry when one finishes",
    )


def _read_team_limit(settings: Settings, team_id: uuid.UUID) -> int:
    with session_scope() as session:
        team = session.get(Team, team_id)
        return quota_limits(team=team, settings=settings)["max_inflight_requests"] if team else 0


def _resolve(settings: Settings, principal: Principal, model: str) -> tuple[Deployment | None, int]:
    """The deployment behind ``model`` (a fine-tuned run's `ft:` name is deployed on its first use) and the
    team's in-flight limit, in one short session: generation can take minutes, so no connection (or
    SQLite read) is held meanwhile."""
    with session_scope() as session:
        deployment = deployments.by_model_name(session=session, team_id=principal.team_id, name=model)
        if deployment is None:
            deployment = fine_tuning.deploy_on_first_use(
                session=session, settings=settings, storage=get_storage(), actor=principal, name=model
            )
        team = session.get(Team, principal.team_id)
        return deployment, quota_limits(team=team, settings=settings)["max_inflight_requests"] if team else 0


def _check_size(settings: Settings, field: str, chars: int, messages: int) -> None:
    """Cap what a worker would tokenize, before anything else: a 10 MB prompt is refused here."""
    caps = settings.inference
    if chars > caps.max_prompt_chars:
        raise InferenceFailed(
            400,
            "string_above_max_length",
            f"{field}: {chars} characters; at most {caps.max_prompt_chars} are allowed (inference.max_prompt_chars)",
            field,
        )
    if messages > caps.max_messages:
        raise InferenceFailed(
            400,
            "array_above_max_length",
            f"{field}: {messages} messages; at most {caps.max_messages} are allowed (inference.max_messages)",
            field,
        )


async def _answer(
    request: Request, settings: Settings, slot: Slot, batch: list[GenerateMessage], reply: Reply
) -> JSONResponse | EventSourceResponse:
    """The answers, streamed or not; the slot is held until they end (or the client leaves)."""
    if batch[0].stream:
        return await _stream(request, settings, batch, reply, slot.release)
    try:
        async with asyncio.TaskGroup() as group:  # one failing choice cancels the others
            tasks = [
                group.create_task(complete(settings, m, request.is_disconnected, reply.first_reply)) for m in batch
            ]
    except BaseExceptionGroup as failed:
        error = failed.exceptions[0]
        reply.finished(None, error.code if isinstance(error, InferenceFailed) else "error")
        raise error from None
    finally:
        await slot.release()
    dones = [t.result() for t in tasks]
    reply.finished(dones)
    return JSONResponse(reply.body(dones))


def _completion_logprobs(done: Done, offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}, character offsets."""
    entries = done.logprobs or []
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{top.token: top.logprob for top in entry.top_logprobs} for entry in entries],
        "text_offset": offsets,
    }


def _sampling(
    settings: Settings, body: CompletionRequest | ChatCompletionRequest, max_tokens: int, *, logprobs: bool
) -> Sampling:
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
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
        top_logprobs=body.top if logprobs else 0,
        logit_bias=body.bias,
    )


def _usage(dones: list[Done]) -> dict[str, int]:
    """The prompt counts once (every choice has the same); completions add up, as OpenAI counts them."""
    prompt, completion = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(
    request: Request,
    settings: Settings,
    batch: list[GenerateMessage],
    reply: Reply,
    release: Callable[[], Awaitable[None]],
) -> EventSourceResponse:
    """Wait for every choice's first reply before answering, so errors found by the worker (a prompt longer
    than the context) are still plain HTTP errors; then stream the choices' chunks as they come."""
    started = False

    async def gone_before_start() -> bool:  # once streaming, sse-starlette watches the connection
        return not started and await request.is_disconnected()

    sources = [replies(settings, m, gone_before_start, reply.first_reply) for m in batch]

    async def close_all() -> None:
        for source in sources:
            await cleanup(source.aclose(), "closing the reply stream")

    try:
        async with asyncio.TaskGroup() as group:
            first_tasks = [group.create_task(anext(source)) for source in sources]
        firsts = [t.result() for t in first_tasks]
    except BaseException as exc:
        try:
            await close_all()
        finally:
            await release()
        error = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
        reply.finished(None, error.code if isinstance(error, InferenceFailed) else "error")
        raise error from None
    started = True

    async def events() -> AsyncIterator[ServerSentEvent]:
        merged: asyncio.Queue[tuple[int, Delta | Done | Exception]] = asyncio.Queue()

        async def pump(index: int, first: Delta | Done | Scored) -> None:
            try:
                item = _generated(first)
                await merged.put((index, item))
                if isinstance(item, Delta):
                    async for later in sources[index]:
                        await merged.put((index, _generated(later)))
            except Exception as exc:  # handed to the consumer, which reports it in the stream
                await merged.put((index, exc))

        pumps = [asyncio.create_task(pump(i, first)) for i, first in enumerate(firsts)]
        dones: dict[int, Done] = {}
        try:
            for index in range(len(batch)):
                for chunk in reply.chunks(index, None):
                    yield ServerSentEvent(data=json.dumps(chunk))
            while len(dones) < len(batch):
                index, item = await merged.get()
                if isinstance(item, Exception):
                    if isinstance(item, InferenceFailed):
                        raise item
                    raise InferenceFailed(502, "bad_reply", f"the reply stream failed: {item!r}")
                if isinstance(item, Done):
                    dones[index] = item
                for chunk in reply.chunks(index, item):
                    yield ServerSentEvent(data=json.dumps(chunk))
            reply.finished([dones[i] for i in range(len(batch))])
            if reply.include_usage:
                yield ServerSentEvent(data=json.dumps(reply.usage_chunk([dones[i] for i in range(len(batch))])))
        except InferenceFailed as exc:  # mid-stream: the OpenAI client raises on an `error` chunk
            reply.finished(None, exc.code)
            yield ServerSentEvent(
                data=json.dumps(
                    {"error": {"message": exc.message, "type": "server_error", "param": exc.param, "code": exc.code}}
                )
            )
        finally:
            for task in pumps:
                task.cancel()
            try:
                await close_all()
            finally:
                await release()
        yield ServerSentEvent(data="[DONE]")

    return EventSourceResponse(events(), ping=15)


def _generated(reply: Delta | Done | Scored) -> Delta | Done:
    if isinstance(reply, Scored):
        raise InferenceFailed(502, "bad_reply", "the worker answered a generation with scores")
    return reply


def _chat_chunks(meta: dict[str, Any]) -> ChunkMaker:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def make(index: int, reply: Delta | Done | None) -> list[dict[str, Any]]:
        if reply is None:
            return [chunk(index, {"role": "assistant", "content": ""})]
        if isinstance(reply, Delta):
            return [chunk(index, {"content": reply.text})]
        return [chunk(index, {}, reply.finish_reason)]

    return make


def _completion_chunks(meta: dict[str, Any], echo: str) -> ChunkMaker:
    def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            **meta,
            "object": "text_completion",
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}],
        }

    def make(index: int, reply: Delta | Done | None) -> list[dict[str, Any]]:
        if reply is None:
            return [chunk(index, echo)] if echo else []
        if isinstance(reply, Delta):
            return [chunk(index, reply.text)]
        return [chunk(index, "", reply.finish_reason)]

    return make
