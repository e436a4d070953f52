"""A request that no live inference worker can take is answered 503 `no_worker` within seconds, not after
the whole queue timeout: the API re-checks the workers' heartbeats while the request waits to be taken.

The stack is private (its own database and redis-server, the queue timeout left at 120 s), so killing its
only inference worker touches nothing shared."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import RedisServer, private_stack
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
QUEUE_TIMEOUT_S = 120.0
STALE_AFTER_S = 4.0
FAST_S = 15.0  # an eighth of the queue timeout: stale_after + a re-check, with room for a slow machine


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Stack, openai.OpenAI]]:
    """One inference worker serving the tiny base model; a client that never retries."""
    server = RedisServer(tmp_path_factory.mktemp("inference-redis"), "inference-redis").start()
    env = {
        "STUDIO_BROKER__URL": server.url,
        "STUDIO_EVENTS__REDIS_URL": server.url,
        "STUDIO_INFERENCE__HEARTBEAT_INTERVAL_S": "0.5",
        "STUDIO_INFERENCE__WORKER_STALE_AFTER_S": str(STALE_AFTER_S),
        "STUDIO_INFERENCE__QUEUE_TIMEOUT_S": str(QUEUE_TIMEOUT_S),
    }
    try:
        with private_stack("faults_inference", tmp_path_factory.mktemp("faults-inference"), env) as stack:
            with stack.http() as http:
                r = http.post("/api/deployments/", json={"base_model": str(tiny_model), "name": "tiny-faults"})
                assert r.status_code == 201, r.text
            key = stack.headers["Authorization"].removeprefix("Bearer ")
            yield stack, openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)
    finally:
        server.kill()


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(
        model="tiny-faults", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, **kw
    )


def answered_no_worker(client: openai.OpenAI, stream: bool) -> float:
    """Seconds until the request is refused; it must be a 503 `no_worker`."""
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        chat(client, stream=stream)
    elapsed = time.monotonic() - started
    assert refused.value.status_code == 503, refused.value
    assert refused.value.body["code"] == "no_worker", refused.value.body
    return elapsed


def ready_worker(stack: Stack, client: openai.OpenAI) -> None:
    stack.start_inference_worker()
    assert chat(client).choices[0].message.content is not None  # the model is loaded and answering


def test_requests_waiting_when_the_only_worker_is_killed_get_503_at_once(
    serving: tuple[Stack, openai.OpenAI],
) -> None:
    stack, client = serving
    ready_worker(stack, client)
    stack.stop("inference", signal.SIGKILL)
    # Sent at once, while the dead worker's last heartbeat is still fresh: the first check passes and the
    # requests wait to be taken; the re-checks notice within stale_after_s.
    with ThreadPoolExecutor(2) as pool:
        waits = list(pool.map(lambda stream: answered_no_worker(client, stream), [False, True]))
    assert max(waits) < FAST_S, f"waited {waits} s (queue timeout {QUEUE_TIMEOUT_S:.0f} s)"
    assert answered_no_worker(client, stream=False) < 2  # with no fresh heartbeat it is refused up front


def test_a_worker_that_dies_before_accepting_a_sent_request_gives_503_at_once(
    serving: tuple[Stack, openai.OpenAI],
) -> None:
    stack, client = serving
    ready_worker(stack, client)
    worker = stack.procs["inference"]
    os.killpg(worker.pid, signal.SIGSTOP)  # alive by its heartbeat, but it takes nothing from now on
    with ThreadPoolExecutor(1) as pool:
        refused = pool.submit(answered_no_worker, client, False)
        time.sleep(1)  # the request is sent and waits to be taken...
        stack.stop("inference", signal.SIGKILL)  # ...when its only worker dies
        assert refused.result(timeout=60) < FAST_S
