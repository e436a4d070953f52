"""The API during a database outage: it answers 503 with Retry-After (OpenAI-shaped under /v1), never 500
or a dropped connection; `/health` stays 200 and `/ready` names the database; and it recovers by itself,
without a restart, when the database is back.

The real API (uvicorn) reaches Postgres through a TCP proxy owned by the test: the outage is the proxy
going away (its port refuses connections, and every open connection is cut)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import sqlalchemy.exc
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.errors import install_error_handlers
from tests.e2e.conftest import TcpProxy, cuttable_stack
from tests.e2e.stack import Stack, wait_for

ANSWER_WITHIN_S = 10.0  # an outage is answered at once (connection refused), not after a pool timeout


@pytest.fixture(scope="module")
def proxied_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, TcpProxy]]:
    with cuttable_stack("outage", tmp_path_factory, workers=False) as (stack, proxy, _):
        yield stack, proxy


def _timed(http: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    started = time.monotonic()
    r = http.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert time.monotonic() - started < ANSWER_WITHIN_S, f"{method} {path} took {time.monotonic() - started:.1f} s"
    return r


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers["Retry-After"]) > 0
    body = r.json()
    detail = body["error"]["message"] if r.request.url.path.startswith("/v1/") else body["detail"]
    assert "database" in detail


@pytest.mark.e2e
@pytest.mark.faults
def test_database_outage_answers_503_and_recovers_without_restart(proxied_stack: tuple[Stack, TcpProxy]) -> None:
    stack, proxy = proxied_stack
    api_pid = stack.procs["api"].pid
    with stack.http(timeout=30) as http:
        team = http.get("/api/users/me").json()["teams"][0]["id"]
        r = http.post("/api/datasets/", json={"name": "before", "rows": [{"text": "hello"}]})
        assert r.status_code == 201, r.text
        r = http.get("/ready")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": {"status": "ok"}, "broker": {"status": "ok"}}

        proxy.stop()  # the outage: pooled connections are cut, new ones are refused
        for _ in range(3):  # each pooled connection found dead, then the reconnect refused: 503 every time
            _assert_unavailable(_timed(http, "GET", "/api/experiments/"))
        _assert_unavailable(_timed(http, "POST", "/api/datasets/", json={"name": "during", "rows": [{"text": "x"}]}))
        _assert_unavailable(_timed(http, "GET", f"/api/teams/{team}"))
        r = _timed(http, "GET", "/v1/models")
        _assert_unavailable(r)
        assert r.json()["error"]["type"] == "server_error"
        r = _timed(http, "GET", "/health")  # liveness needs no database: no restart for an outage
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = _timed(http, "GET", "/ready")
        assert r.status_code == 503, r.text
        assert r.json()["failed"] == ["database"]
        assert r.json()["checks"]["broker"] == {"status": "ok"}

        proxy.start()  # the database is back: the same API process answers again
        wait_for(lambda: http.get("/ready").status_code == 200, timeout_s=30, what="/ready after the outage")
        for _ in range(3):
            assert http.get("/api/experiments/").status_code == 200
        assert http.get("/v1/models").status_code == 200
        r = http.post("/api/datasets/", json={"name": "after", "rows": [{"text": "hello"}]})
        assert r.status_code == 201, r.text
        names = [d["name"] for d in http.get("/api/datasets/").json()["data"]]
        assert sorted(names) == ["after", "before"]  # the request refused during the outage left nothing
    assert stack.procs["api"].poll() is None and stack.procs["api"].pid == api_pid


@pytest.mark.parametrize(
    "exc",
    [
        sqlalchemy.exc.TimeoutError("QueuePool limit of size 20 overflow 20 reached"),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")),
        sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")),
        psycopg.OperationalError("connection refused"),
        psycopg.InterfaceError("the connection is closed"),
    ],
    ids=lambda e: type(e).__module__.split(".")[0] + "." + type(e).__name__,
)
def test_database_errors_are_503_with_retry_after(exc: Exception) -> None:
    """Pool exhaustion and an unreachable database are 503 + Retry-After with a JSON detail, in OpenAI's
    shape under /v1, never 500."""
    app = FastAPI()
    install_error_handlers(app)

    def fail() -> None:
        raise exc

    app.get("/api/thing")(fail)
    app.get("/v1/models")(fail)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/api/thing")
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
        assert "database" in r.json()["detail"]
        r = client.get("/v1/models")
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "database" in error["message"], error
