"""A bounded load test on loopback: 200 concurrent mixed requests (creates, reads, SSE) against the real
API in its production configuration (Postgres, Redis broker and events, production settings) with the
API's default pool and threadpool sizes. No 5xx is allowed (429 is, though the quotas are raised), every
create must leave exactly its row, and p50/p99 latencies are printed (and written to
``$STUDIO_TEST_REPORT_DIR/load.json`` when that is set). No workers: creates only queue.

Reproduce: ``.venv/bin/python -m pytest -q -s -p no:cacheprovider tests/e2e/test_load.py``"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.e2e.conftest import RedisServer, private_stack
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CONCURRENCY = 200
# How the 200 requests are mixed: creates, list and single reads, and SSE streams read to their first event.
MIX = {"create_experiment": 40, "create_dataset": 20, "list": 50, "get": 60, "sse": 30}
REQUEST_TIMEOUT_S = 45.0  # the old stall answered 500 after the pool's 30 s timeout; fail rather than hang
BURST_LIMIT_S = 60.0
BASE_MODEL = "sshleifer/tiny-gpt2"  # a Hub id is accepted at submit; no worker runs here
ROWS = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(8)]


@dataclass
class Outcome:
    kind: str
    name: str | None  # what a create was called, to find its row afterwards
    status: int  # 0: no HTTP answer (connection dropped or timed out)
    seconds: float
    error: str = ""


@pytest.fixture(scope="module")
def load_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis_server = RedisServer(tmp_path_factory.mktemp("load-redis"), "load-redis").start()
    env = {
        "STUDIO_ENVIRONMENT": "production",
        "STUDIO_AUTH__JWT_KEYS": json.dumps({"load": "k" * 48}),
        "STUDIO_BROKER__URL": redis_server.url,
        "STUDIO_EVENTS__REDIS_URL": redis_server.url.removesuffix("/0") + "/1",
        # Quotas high enough that every create in the burst is allowed.
        "STUDIO_QUOTAS__MAX_ACTIVE_JOBS": "1000",
        "STUDIO_QUOTAS__MAX_QUEUED_JOBS": "1000",
    }
    try:
        with private_stack("load", tmp_path_factory.mktemp("load"), env) as s:
            assert s.env["STUDIO_DATABASE__URL"].startswith("postgresql://")
            yield s
    finally:
        redis_server.kill()


async def _one(client: httpx.AsyncClient, kind: str, i: int, ids: dict[str, list[str]]) -> Outcome:
    name = f"load-{kind}-{i}" if kind.startswith("create") else None
    started = time.monotonic()
    try:
        if kind == "create_experiment":
            body = {"name": name, "base_model": BASE_MODEL, "dataset_id": random.choice(ids["datasets"])}
            status = (await client.post("/api/experiments/", json=body)).status_code
        elif kind == "create_dataset":
            status = (await client.post("/api/datasets/", json={"name": name, "rows": ROWS})).status_code
        elif kind == "list":
            status = (await client.get(random.choice(["/api/experiments/", "/api/datasets/"]))).status_code
        elif kind == "get":
            what = random.choice(["experiments", "datasets"])
            status = (await client.get(f"/api/{what}/{random.choice(ids[what])}")).status_code
        else:
            path = f"/api/experiments/{random.choice(ids['experiments'])}/events"
            async with aconnect_sse(client, "GET", path) as source:
                status = source.response.status_code
                if status == 200:
                    async for sse in source.aiter_sse():
                        if sse.data:  # the first event that carries data: the experiment's `queued` status
                            assert json.loads(sse.data)["status"] == "queued"
                            break
    except (httpx.HTTPError, AssertionError) as exc:
        return Outcome(kind, name, 0, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    return Outcome(kind, name, status, time.monotonic() - started)


async def _burst(stack: Stack, ids: dict[str, list[str]]) -> list[Outcome]:
    kinds = [kind for kind, n in MIX.items() for _ in range(n)]
    assert len(kinds) == CONCURRENCY
    random.Random(0).shuffle(kinds)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=stack.url, headers=stack.headers, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:
        tasks = [_one(client, kind, i, ids) for i, kind in enumerate(kinds)]
        return await asyncio.wait_for(asyncio.gather(*tasks), BURST_LIMIT_S)


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_200_concurrent_mixed_requests_answer_without_5xx(load_stack: Stack) -> None:
    stack = load_stack
    with stack.http() as http:  # a few rows to read and stream, made before the burst
        ids: dict[str, list[str]] = {"datasets": [], "experiments": []}
        for n in range(3):
            r = http.post("/api/datasets/", json={"name": f"seed-{n}", "rows": ROWS})
            assert r.status_code == 201, r.text
            ids["datasets"].append(r.json()["id"])
        for n in range(5):
            body = {"name": f"seed-{n}", "base_model": BASE_MODEL, "dataset_id": ids["datasets"][0]}
            r = http.post("/api/experiments/", json=body)
            assert r.status_code == 201, r.text
            ids["experiments"].append(r.json()["id"])

    started = time.monotonic()
    outcomes = asyncio.run(_burst(stack, ids))
    wall = time.monotonic() - started

    latencies = [o.seconds for o in outcomes]
    by_status: dict[int, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    report: dict[str, Any] = {
        "requests": len(outcomes),
        "mix": MIX,
        "wall_s": round(wall, 2),
        "p50_ms": round(1000 * _percentile(latencies, 50), 1),
        "p99_ms": round(1000 * _percentile(latencies, 99), 1),
        "max_ms": round(1000 * max(latencies), 1),
        "statuses": {str(k): v for k, v in sorted(by_status.items())},
        "per_kind_p99_ms": {
            kind: round(1000 * _percentile([o.seconds for o in outcomes if o.kind == kind], 99), 1) for kind in MIX
        },
    }
    print("\nload:", json.dumps(report))
    if report_dir := os.environ.get("STUDIO_TEST_REPORT_DIR"):
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "load.json").write_text(json.dumps(report, indent=2) + "\n")

    failed = [o for o in outcomes if o.status >= 500 or o.status == 0]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]} ({report})"
    unexpected = [o for o in outcomes if o.status not in (200, 201, 429)]
    assert not unexpected, unexpected[:5]

    # Every create answered 201 left exactly its row; one refused (429) left none.
    with stack.http() as http:
        rows = {
            kind: [r["name"] for r in http.get(f"/api/{what}/", params={"limit": 500}).json()["data"]]
            for kind, what in (("create_experiment", "experiments"), ("create_dataset", "datasets"))
        }
    for o in outcomes:
        if o.name is not None:
            assert rows[o.kind].count(o.name) == (1 if o.status == 201 else 0), o
    assert "Traceback" not in stack.log("api"), stack.log("api")[-3000:]
