"""Training under faults, on the production shape (Postgres, Redis, real worker processes, the API over HTTP).

Each test is one guarantee of docs/reliability.md: an interrupted run is handed off and resumed, never
`succeeded` early; a worker's SIGTERM hands its job back at once; a lost broker message recovers by itself.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.cli.processes import worker_command
from tests.e2e.stack import E2E_REDIS, Stack, wait_for
from tests.e2e.test_training_postgres import experiment_row, follow, query, submit, upload

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

MAX_STEPS = 200  # a few seconds of the tiny model: 60 steps took 2 s, the same as a slow handoff


def _long_run(http: httpx.Client, stack: Stack, model: Path, data: Path) -> str:
    """A run that checkpoints every 5 steps; returns its id once a checkpoint is stored."""
    dataset = upload(http, data)
    exp = submit(http, dataset["id"], model, max_steps=MAX_STEPS, save_steps=5, logging_steps=5)
    wait_for(lambda: _events(stack, exp["id"], "checkpoint"), what="a checkpoint")
    return str(exp["id"])


def _events(stack: Stack, experiment_id: str, type_: str) -> list[dict[str, Any]]:
    rows = query(stack, "SELECT type, data FROM experiment_event WHERE experiment_id = :id ORDER BY seq", experiment_id)
    return [r["data"] for r in rows if r["type"] == type_]


def _sent(stack: Stack, experiment_id: str) -> bool:
    """Whether the outbox has sent every message of the experiment (and there is one)."""
    sql = "SELECT sent_at FROM outbox WHERE payload->>'experiment_id' = CAST(:id AS text)"
    rows = query(stack, sql, experiment_id)
    return bool(rows) and all(r["sent_at"] for r in rows)


def _assert_resumed_once(stack: Stack, experiment_id: str, how: str, losses: int = 0) -> None:
    """Ended succeeded exactly once, after a handoff (not a worker loss), resuming past its checkpoint."""
    events = follow(stack, experiment_id)
    statuses = [(d["status"], d.get("reason", "")) for _, k, d in events if k == "status"]
    assert [s for s, _ in statuses] == ["queued", "running", "queued", "running", "succeeded"], statuses
    assert how in statuses[2][1], statuses
    started = [d for _, k, d in events if k == "started"]
    assert len(started) == 2 and started[1]["start_step"] > 0, "the second attempt started over"
    row = experiment_row(stack, experiment_id)
    assert (row["attempt"], row["worker_losses"]) == (2, losses)
    assert row["final_metrics"]["global_step"] == MAX_STEPS, "a truncated run was delivered"


def test_sigterm_to_the_trainer_is_a_handoff_not_a_success(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    """Found: a trainer that got SIGTERM saved and exited, and the job was `succeeded` at step 422 of 4000."""
    with stack.http() as http:
        experiment_id = _long_run(http, stack, tiny_model, chat_file)
        pid = experiment_row(stack, experiment_id)["pid"]
        os.kill(pid, signal.SIGTERM)  # a node drain reaching the trainer child
    _assert_resumed_once(stack, experiment_id, "sigterm")


def test_kill_9_of_the_trainer_resumes_past_its_checkpoint_once(
    stack: Stack, tiny_model: Path, chat_file: Path
) -> None:
    """The OOM killer or an operator's kill -9 of the trainer alone: a lost attempt, retried from the checkpoint
    (counted against training.max_attempts), not a failure and not a success."""
    with stack.http() as http:
        experiment_id = _long_run(http, stack, tiny_model, chat_file)
        os.kill(experiment_row(stack, experiment_id)["pid"], signal.SIGKILL)
    _assert_resumed_once(stack, experiment_id, "SIGKILL", losses=1)


def test_sigterm_to_the_worker_hands_the_job_off_at_once(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    """Found: a worker's SIGTERM (the usual eviction) neither checkpointed nor handed the job back."""
    with stack.http() as http:
        experiment_id = _long_run(http, stack, tiny_model, chat_file)
        # Celery's warm shutdown; `stop` returns once the worker has exited.
        with stack.stopped("worker", worker_command(["train.cpu"], "train-test-after-drain@%h"), signal.SIGTERM):
            row = experiment_row(stack, experiment_id)
            # Handed back before the worker exited: no stale-window wait, not counted as a loss.
            assert (row["status"], row["worker_losses"]) == ("queued", 0), row
    _assert_resumed_once(stack, experiment_id, "handed off")


def test_a_lost_broker_message_is_sent_again(stack: Stack, tiny_model: Path, chat_file: Path) -> None:
    """Found: a queued job whose broker message was lost (Redis failover) stayed `queued` forever."""
    with stack.stopped("worker", worker_command(["train.cpu"], "train-test-after-loss@%h")), stack.http() as http:
        dataset = upload(http, chat_file)
        exp = submit(http, dataset["id"], tiny_model, max_steps=5)
        wait_for(lambda: _sent(stack, exp["id"]), what="the outbox to send the message")
        assert redis.Redis.from_url(E2E_REDIS).delete("train.cpu") == 1  # the broker loses it
    events = follow(stack, exp["id"])
    assert [d["status"] for _, k, d in events if k == "status"] == ["queued", "running", "succeeded"]
    assert "its message was sent again" in stack.log("api")
