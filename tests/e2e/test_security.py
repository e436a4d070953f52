"""Security with real processes: the worker refuses pickle, the team channel reports state changes,
and the CLI will not start Flower without authentication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from httpx_sse import connect_sse
from kombu import Connection

from tests.e2e.stack import E2E_REDIS, REPO, Stack, wait_for

pytestmark = pytest.mark.e2e


class _MakeDir:
    """Unpickling this runs os.mkdir(marker): proof that a worker deserialized pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_worker_refuses_a_pickle_message(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    task_id = str(uuid.uuid4())
    with Connection(E2E_REDIS) as conn:
        queue = conn.SimpleQueue("train.cpu")
        queue.put(
            ((_MakeDir(marker),), {}, {}),
            serializer="pickle",
            headers={
                "lang": "py",
                "task": "studio.ping",
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "argsrepr": "()",
                "kwargsrepr": "{}",
            },
        )
        queue.close()
    wait_for(
        lambda: "Refusing to deserialize untrusted content of type pickle" in stack.log("worker"),
        timeout_s=60,
        what="the worker to refuse the pickle message",
    )
    wait_for(lambda: not redis.Redis.from_url(E2E_REDIS).llen("train.cpu"), timeout_s=30, what="the queue to drain")
    time.sleep(1)
    assert not marker.exists(), "the worker unpickled a message"
    assert f"Task studio.ping[{task_id}] succeeded" not in stack.log("worker")


def test_team_channel_reports_experiment_state_changes(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    with stack.http() as http:
        team = http.get("/api/users/me").json()["teams"][0]["id"]
        seen: list[dict[str, Any]] = []
        connected = threading.Event()

        def listen() -> None:
            with stack.http(timeout=120) as listener, connect_sse(listener, "GET", f"/api/teams/{team}/events") as src:
                connected.set()
                for sse in src.iter_sse():
                    if sse.event == "experiment":
                        seen.append({**json.loads(sse.data), "id": int(sse.id)})
                        if seen[-1]["status"] in ("succeeded", "failed", "cancelled"):
                            return

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        assert connected.wait(30)
        with chat_file.open("rb") as f:
            dataset = http.post("/api/datasets/upload", files={"file": ("chat.jsonl", f)}).json()["id"]
        exp = http.post(
            "/api/experiments/",
            json={
                "name": "watched",
                "base_model": str(tiny_model),
                "dataset_id": dataset,
                "recipe": "tiny_lora_cpu",
                "hyperparameters": {"max_steps": 5},
            },
        ).json()
        thread.join(120)
    mine = [e for e in seen if e["experiment_id"] == exp["id"]]
    assert [e["status"] for e in mine] == ["queued", "running", "succeeded"], seen
    assert all(e["name"] == "watched" for e in mine)
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)


def test_flower_needs_basic_auth() -> None:
    env = {k: v for k, v in os.environ.items() if k != "STUDIO_FLOWER_BASIC_AUTH"}
    r = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "flower"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "--basic-auth" in r.stderr and len(r.stderr.strip().splitlines()) == 1
