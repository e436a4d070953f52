"""Liveness (`/health`) and readiness (`/ready`), both public.

`/health` answers from the event loop without touching the database or the broker, so a liveness
probe never restarts an API that is only waiting for them. `/ready` checks both with short timeouts,
each on a connection of its own, and answers 503 naming what failed: take the API out of rotation,
do not restart it; it recovers by itself when they are back."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import redis
from anyio.lowlevel import RunVar
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import SettingsDep
from app.api.responses import READY_RESPONSES
from app.core.config import Settings
from app.core.db import ping_database

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 2
# Probes get threads of their own, so they answer while every request thread is busy.
_probe_threads: RunVar[anyio.CapacityLimiter] = RunVar("studio_probe_threads")


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves requests. Needs neither the database nor the broker."""
    return {"status": "ok"}


@router.get("/ready", response_model=None, responses=READY_RESPONSES)
async def ready(settings: SettingsDep) -> JSONResponse:
    """Readiness: the database and the broker answer within a couple of seconds (200), else 503 with
    the failing check(s) under `failed`."""
    checks: dict[str, dict[str, str]] = {}
    probes: dict[str, Callable[[], Any]] = {
        "database": lambda: ping_database(CHECK_TIMEOUT_S),
        "broker": lambda: _ping_broker(settings),
    }
    async with anyio.create_task_group() as tg:
        for name, probe in probes.items():
            tg.start_soon(_run_check, name, probe, checks)
    failed = sorted(name for name, check in checks.items() if check["status"] != "ok")
    body = {"status": "unavailable" if failed else "ok", "checks": checks, "failed": failed}
    return JSONResponse(body, status_code=503 if failed else 200)


async def _run_check(name: str, probe: Callable[[], Any], checks: dict[str, dict[str, str]]) -> None:
    limiter = _probe_threads.get(None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(4)
        _probe_threads.set(limiter)
    checks[name] = {"status": "timeout"}  # unless it answers in time (a hung peer's thread is abandoned)
    with anyio.move_on_after(CHECK_TIMEOUT_S + 1):
        try:
            await anyio.to_thread.run_sync(probe, abandon_on_cancel=True, limiter=limiter)
            checks[name] = {"status": "ok"}
        except Exception as exc:  # noqa: BLE001 - the probe reports any failure; details only in the log
            log.warning("readiness: %s check failed: %s", name, exc)
            checks[name] = {"status": "error", "error": type(exc).__name__}


def _ping_broker(settings: Settings) -> None:
    url = settings.broker.url
    if url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    elif url.startswith("sqla+sqlite:///"):  # the embedded broker: its SQLite file (made at first use)
        path = Path(url.removeprefix("sqla+sqlite:///"))
        if path.exists():
            with closing(
                sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S)
            ) as conn:
                conn.execute("SELECT 1")
        elif not os.access(path.parent, os.W_OK):
            raise FileNotFoundError(f"broker file {path} is missing and its directory is not writable")
    # Another transport (AMQP, ...): nothing to ping here.
