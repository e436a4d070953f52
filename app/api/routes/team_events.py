"""The team's live channel (SSE): every experiment state change of the team, as it happens.

The database is the truth (status events); Redis pub/sub only wakes the stream (without it, or while it
is down, the stream re-reads every ``events.poll_interval_s``). Event ids are the global event row ids,
so a client resumes with Last-Event-ID. Ids are allocated before commit, so a slow transaction can
commit an id below one already sent; the stream re-reads a short window behind its cursor and skips
what it has sent, so such an event is still delivered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import SessionDep, Viewer
from app.core import notify
from app.core.db import session_scope
from app.core.event_log import latest_event_id, team_status_events
from app.services.principal import Principal, still_allowed

router = APIRouter(tags=["events"])
LOOKBACK_IDS = 200
RECHECK_S = 10.0


@router.get("/teams/{team_id}/events")
async def stream_team_events(
    session: SessionDep,
    principal: Viewer,
    team_id: uuid.UUID,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
) -> EventSourceResponse:
    """Server-sent `experiment` events: {experiment_id, name, status, attempt} on every state change.
    Without Last-Event-ID the stream starts from now."""
    await run_in_threadpool(session.close)  # the stream may last hours; it reads with short sessions of its own
    start = last_event_id if last_event_id is not None else await run_in_threadpool(_latest_id, principal.team_id)
    return EventSourceResponse(_stream(principal, start), ping=10)


async def _stream(principal: Principal, start: int) -> AsyncIterator[ServerSentEvent]:
    team_id, cursor, sent = principal.team_id, start, set[int]()
    recheck_at = time.monotonic() + RECHECK_S
    yield ServerSentEvent(retry=notify.retry_ms())  # after a cut, the client reconnects (with Last-Event-ID) soon
    async with notify.ChangeWaiter(notify.team_channel(team_id)) as waiter:
        while True:
            if time.monotonic() >= recheck_at:  # removed from the team, or key revoked: the stream ends
                recheck_at = time.monotonic() + RECHECK_S
                if not await run_in_threadpool(still_allowed, principal):
                    return
            rows = await run_in_threadpool(_read, team_id, max(start, cursor - LOOKBACK_IDS))
            for event_id, payload in rows:
                if event_id in sent:
                    continue
                sent.add(event_id)
                cursor = max(cursor, event_id)
                yield ServerSentEvent(data=json.dumps(payload), event="experiment", id=str(event_id))
            sent = {i for i in sent if i > cursor - LOOKBACK_IDS}
            await waiter.wait()


def _read(team_id: uuid.UUID, after_id: int) -> list[tuple[int, dict[str, object]]]:
    with session_scope() as session:
        rows = team_status_events(session=session, team_id=team_id, after_id=after_id)
        out: list[tuple[int, dict[str, object]]] = []
        for event, name in rows:
            assert event.id is not None
            payload = {
                "experiment_id": str(event.experiment_id),
                "name": name,
                **event.data,
                "created_at": event.created_at.isoformat(),
            }
            out.append((event.id, payload))
        return out


def _latest_id(team_id: uuid.UUID) -> int:
    with session_scope() as session:
        return latest_event_id(session=session)
