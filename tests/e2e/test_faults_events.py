"""Live events survive Redis going away: SSE streams fall back to re-reading the database, stay open,
and are woken by Redis again once it is back. The API runs against a private redis-server for events
(SIGKILLed and restarted here) and another one as its broker, so nothing shared is touched."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import ServerSentEvent, connect_sse
from sqlalchemy import Engine
from sqlmodel import Session, create_engine

from app.core.event_log import record_event
from tests.e2e.conftest import RedisServer, private_stack
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
POLL_S = 0.5
DELIVER_S = 10 * POLL_S  # "a few poll intervals", with room for a slow machine
ENDED = object()


@pytest.fixture(scope="module")
def events_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("events-redis"), "events-redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def events_stack(tmp_path_factory: pytest.TempPathFactory, events_redis: RedisServer) -> Iterator[Stack]:
    broker = RedisServer(tmp_path_factory.mktemp("broker-redis"), "broker-redis").start()
    env = {
        "STUDIO_BROKER__URL": broker.url,  # no training worker: experiments stay queued
        "STUDIO_EVENTS__REDIS_URL": events_redis.url,
        "STUDIO_EVENTS__POLL_INTERVAL_S": str(POLL_S),
    }
    try:
        with private_stack("faults_events", tmp_path_factory.mktemp("faults-events"), env) as s:
            yield s
    finally:
        broker.kill()


class Listener:
    """Reads one SSE stream on a thread; events (and ENDED, or the exception that ended it) go to a queue."""

    def __init__(self, stack: Stack, path: str) -> None:
        self.got: queue.Queue[Any] = queue.Queue()
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stack, path), daemon=True)
        self.thread.start()
        assert self.connected.wait(30), f"could not open {path}"

    def _run(self, stack: Stack, path: str) -> None:
        try:
            with stack.http(timeout=300) as http, connect_sse(http, "GET", path) as source:
                source.response.raise_for_status()
                self.connected.set()
                for sse in source.iter_sse():
                    self.got.put(sse)
            self.got.put(ENDED)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.got.put(exc)

    def next(self, timeout_s: float = DELIVER_S) -> ServerSentEvent:
        try:
            item = self.got.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout_s} s") from None
        assert isinstance(item, ServerSentEvent), f"the stream ended: {item!r}"
        return item

    def next_data(self, timeout_s: float = DELIVER_S) -> tuple[str, dict[str, Any]]:
        """The next event that carries data (keep-alive pings and retry-only events skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            sse = self.next(max(0.01, deadline - time.monotonic()))
            if sse.data:
                return sse.event, json.loads(sse.data)

    def assert_open(self) -> None:
        assert self.thread.is_alive(), f"the stream ended: {list(self.got.queue)[-1:]}"


def test_sse_streams_fall_back_to_polling_when_redis_dies_and_stay_open(
    events_stack: Stack, events_redis: RedisServer, tiny_model: Path, chat_file: Path
) -> None:
    stack = events_stack
    engine: Engine = create_engine(stack.env["STUDIO_DATABASE__URL"])
    with stack.http() as http:
        team = http.get("/api/users/me").json()["teams"][0]["id"]
        with chat_file.open("rb") as f:
            dataset = http.post("/api/datasets/upload", files={"file": ("chat.jsonl", f)}).json()["id"]

        def submit(name: str) -> str:
            r = http.post(
                "/api/experiments/",
                json={"name": name, "base_model": str(tiny_model), "dataset_id": dataset, "recipe": "tiny_lora_cpu"},
            )
            assert r.status_code == 201, r.text
            assert r.json()["status"] == "queued"
            return str(r.json()["id"])

        def metric(experiment_id: str, step: int) -> None:
            """A metrics event written the way a worker writes one (no notification: the stream must poll)."""
            with Session(engine) as session:
                record_event(session, uuid.UUID(experiment_id), "metrics", {"step": step, "loss": 1.0 / step})
                session.commit()

        def stop(experiment_id: str) -> None:
            r = http.post(f"/api/experiments/{experiment_id}/stop")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text

        watched = submit("watched")
        team_stream = Listener(stack, f"/api/teams/{team}/events")
        exp_stream = Listener(stack, f"/api/experiments/{watched}/events")
        for listener in (team_stream, exp_stream):  # the client learns how soon to reconnect after a cut
            first = listener.next()
            assert first.retry is not None and 0 < first.retry <= 10_000, first
        event, data = exp_stream.next_data()
        assert (event, data["status"], data["seq"]) == ("status", "queued", 1)

        # Redis up: a change arrives.
        other = submit("other")
        assert team_stream.next_data()[1]["experiment_id"] == other
        metric(watched, 1)
        assert exp_stream.next_data()[1]["step"] == 1

        # Redis gone (SIGKILL): the streams poll the database instead, and stay open.
        events_redis.kill()
        time.sleep(2 * POLL_S)  # the waiters have met the dead connection
        started = time.monotonic()
        metric(watched, 2)
        stop(other)
        assert exp_stream.next_data()[1]["step"] == 2
        event, data = team_stream.next_data()
        assert (event, data["experiment_id"], data["status"]) == ("experiment", other, "cancelled")
        assert time.monotonic() - started < DELIVER_S
        third = submit("third")  # submitting works without events Redis too
        assert team_stream.next_data()[1]["experiment_id"] == third
        time.sleep(3 * POLL_S)  # several failed re-subscriptions later, still open
        exp_stream.assert_open()
        team_stream.assert_open()

        # Redis back on the same port: events keep flowing.
        events_redis.start()
        for step in (3, 4):
            metric(watched, step)
            assert exp_stream.next_data()[1]["step"] == step
        stop(third)
        assert team_stream.next_data()[1]["status"] == "cancelled"
        exp_stream.assert_open()
        team_stream.assert_open()

        # A terminal status still ends the experiment's stream normally.
        stop(watched)
        assert exp_stream.next_data()[1]["status"] == "cancelled"
        assert exp_stream.got.get(timeout=DELIVER_S) is ENDED
    engine.dispose()
    assert "Traceback" not in stack.log("api"), stack.log("api")[-3000:]
