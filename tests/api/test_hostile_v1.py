"""/v1 under hostile load, on a real stack (Postgres, a private redis-server, the API, an inference worker
on the tiny model): oversized prompts are refused by the API before any worker sees them; a prompt past the
context is refused by the worker having tokenized only a bounded prefix; a burst of 200 concurrent requests
with one key meets the team's in-flight quota (200s and 429s only) while another team's reads stay fast.

Reproduce: ``.venv/bin/python -m pytest -q -s -p no:cacheprovider tests/api/test_hostile_v1.py``"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import RedisServer, private_stack
from tests.e2e.stack import Stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

MODEL = "tiny-hostile"
MAX_PROMPT_CHARS = 4_000_000  # raised from the default, so a multi-MB prompt reaches the worker
CONTEXT = 2048  # the tiny model's
BURST = 200
QUOTA = 16  # the team's in-flight requests: far fewer than the burst, so it must be met
GETS_P99_S = 1.0  # the bound for another team's reads during the burst


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A private stack with one inference worker serving the tiny base model as ``MODEL``."""
    server = RedisServer(tmp_path_factory.mktemp("hostile-redis"), "hostile-redis").start()
    env = {
        "STUDIO_BROKER__URL": server.url,
        "STUDIO_EVENTS__REDIS_URL": server.url,
        "STUDIO_INFERENCE__HEARTBEAT_INTERVAL_S": "0.5",
        "STUDIO_INFERENCE__MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
    }
    try:
        with private_stack("hostile_v1", tmp_path_factory.mktemp("hostile-v1"), env) as stack:
            stack.start_inference_worker()
            with stack.http() as http:
                r = http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": MODEL})
                assert r.status_code == 201, r.text
                assert _chat(http, "hi").status_code == 200  # the model is loaded and answering
            yield stack
    finally:
        server.kill()


def _chat(http: httpx.Client, content: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return http.post("/v1/chat/completions", json=body)


def _memory_mb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) // 1024 for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def _received(stack: Stack) -> int:
    """Generation tasks the inference worker has taken so far (Celery logs each one it receives)."""
    return stack.log("inference").count("studio.generate[")


def test_a_prompt_past_the_context_is_refused_by_the_worker_after_bounded_tokenization(hostile: Stack) -> None:
    """First in the module: the worker's peak memory (VmHWM) has seen only the model and one short chat.
    Tokenized whole, this 3 MB prompt took the tiny model's worker up by ~500 MB (and seconds)."""
    pid = hostile.procs["inference"].pid
    before = _memory_mb(pid)
    big = " ".join(f"the cat likes a short story {i}" for i in range(90_000))
    assert 2_500_000 < len(big) < MAX_PROMPT_CHARS
    with hostile.http(timeout=120) as http:
        r = _chat(http, big)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    after = _memory_mb(pid)
    print(f"inference worker memory before {before}, after {after} (MB)")
    assert after["VmHWM"] - before["VmHWM"] < 100, (before, after)

    just_over = " assistant" * (CONTEXT - 16 + 1)  # one token more than fits beside max_tokens=16
    with hostile.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": just_over, "max_tokens": 16})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"
    assert f"the prompt has {CONTEXT - 16 + 1} tokens" in r.json()["error"]["message"]


def test_a_10mb_prompt_is_refused_by_the_api_without_reaching_the_worker(hostile: Stack) -> None:
    huge = "a " * 5_000_000
    received = _received(hostile)
    with hostile.http() as http:
        started = time.monotonic()
        chat = _chat(http, huge)
        completion = http.post("/v1/completions", json={"model": MODEL, "prompt": huge, "max_tokens": 2})
        elapsed = time.monotonic() - started
    for r, param in ((chat, "messages"), (completion, "prompt")):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "string_above_max_length", error
        assert "max_prompt_chars" in error["message"]
    time.sleep(1)  # a task sent anyway would be in the worker's log by now
    assert _received(hostile) == received, "an oversized prompt reached the inference worker"
    print(f"two 10 MB prompts refused in {elapsed:.2f} s")


def test_a_burst_with_one_key_meets_the_quota_and_other_teams_still_answer(hostile: Stack) -> None:
    with httpx.Client(base_url=hostile.url, headers=hostile.jwt_headers, timeout=60) as admin:
        team = admin.get("/api/users/me").json()["teams"][0]["id"]
        r = admin.put(f"/api/teams/{team}/quota", json={"max_inflight_requests": QUOTA})
        assert r.status_code == 200, r.text
        viewer = admin.post(f"/api/teams/{team}/api-keys/", json={"name": "burst", "role": "viewer"}).json()["key"]
        other_team = admin.post("/api/teams/", json={"name": f"bystander-{time.time_ns()}"}).json()["id"]
        other = admin.post(f"/api/teams/{other_team}/api-keys/", json={"name": "b", "role": "viewer"}).json()["key"]
    answers, latencies = asyncio.run(_burst(hostile.url, viewer, other))
    statuses = [status for status, _ in answers]
    counts = {s: statuses.count(s) for s in set(statuses)}
    samples = {status: text[:300] for status, text in answers}
    latencies.sort()
    p99 = latencies[max(0, round(0.99 * len(latencies)) - 1)]
    p50 = statistics.median(latencies)
    print(f"burst statuses {counts}; other team's GETs: n={len(latencies)} p50={p50:.3f}s p99={p99:.3f}s")
    assert set(counts) <= {200, 429}, samples
    assert counts.get(429, 0) > 0, f"the in-flight quota of {QUOTA} was never reached: {counts}"
    assert counts.get(200, 0) >= QUOTA, samples
    assert len(latencies) >= 20 and p99 < GETS_P99_S, latencies


# Another team's reads, in a process of their own, so that they measure the server, not this process's
# event loop busy with the burst (and without importing the tests, whose conftest makes a database).
READER = """
import json, sys, time
from pathlib import Path
import httpx
url, key, ready, stop = sys.argv[1:]
latencies = []
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
    while not Path(stop).exists() or len(latencies) < 20:
        started = time.monotonic()
        status = http.get("/api/deployments/").status_code
        if status != 200:
            sys.exit(f"GET /api/deployments/ answered {status}")
        if not Path(ready).exists():
            Path(ready).touch()  # the connection is open and warm: measure from the next read on
        else:
            latencies.append(time.monotonic() - started)
print(json.dumps(latencies))
"""


async def _burst(url: str, key: str, other_key: str) -> tuple[list[tuple[int, str]], list[float]]:
    """``BURST`` chats at once with one key while another team lists its deployments, one GET after
    another, until the burst is over. Returns the burst's answers (status, body) and the reads' latencies."""
    limits = httpx.Limits(max_connections=BURST + 10, max_keepalive_connections=BURST + 10)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    flags = Path(tempfile.mkdtemp())
    ready, stop = flags / "reading", flags / "burst-over"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, url, other_key, str(ready), str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: ready.exists() or reader.poll() is not None, timeout_s=30, what="the reader")
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=60
        ) as client:

            async def one() -> tuple[int, str]:
                r = await client.post("/v1/chat/completions", json=body)
                return r.status_code, r.text

            started = time.monotonic()
            answers = await asyncio.gather(*(one() for _ in range(BURST)))
            print(f"the burst took {time.monotonic() - started:.2f} s")
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    finally:
        stop.touch()
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, out
    return answers, json.loads(out)
