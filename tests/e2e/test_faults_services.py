"""A training run while its services fail: the database goes away for a few seconds (a failover, a network
blip), and the broker restarts without persistence. Neither may kill the run, fail it, or run it twice.

A stack of its own: the API and a training worker reach Postgres through a TCP proxy the test can cut,
and use a private redis-server as broker and event bus, which the test SIGKILLs and starts again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import RedisServer, TcpProxy, cuttable_stack
from tests.e2e.stack import Stack, wait_for
from tests.e2e.test_training_postgres import experiment_row, follow, query, submit, upload

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

MAX_STEPS = 40
OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, TcpProxy, RedisServer]]:
    env = {
        "STUDIO_TRAINING__HEARTBEAT_INTERVAL_S": "1",
        "STUDIO_TRAINING__STALE_AFTER_S": "30",  # far longer than the outage: nobody should look lost
    }
    with cuttable_stack("faulty", tmp_path_factory, workers=True, env=env) as parts:
        yield parts


def _running_with_a_checkpoint(stack: Stack, tiny_model: Path, chat_file: Path) -> str:
    with stack.http() as http:
        dataset = upload(http, chat_file)
        exp = submit(http, dataset["id"], tiny_model, max_steps=MAX_STEPS, save_steps=5, logging_steps=5)
    wait_for(
        lambda: query(
            stack, "SELECT 1 FROM experiment_event WHERE experiment_id = :id AND type = 'checkpoint'", exp["id"]
        ),
        what="a checkpoint",
    )
    return str(exp["id"])


def _assert_one_clean_success(stack: Stack, experiment_id: str) -> None:
    events = follow(stack, experiment_id)
    statuses = [d["status"] for _, k, d in events if k == "status"]
    assert statuses == ["queued", "running", "succeeded"], (statuses, stack.log("worker")[-3000:])
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1)), "gap or duplicate in the event log"
    row = experiment_row(stack, experiment_id)
    assert (row["attempt"], row["worker_losses"], row["final_metrics"]["global_step"]) == (1, 0, MAX_STEPS)


def test_a_database_outage_mid_run_does_not_kill_the_run(
    faulty: tuple[Stack, TcpProxy, RedisServer], tiny_model: Path, chat_file: Path
) -> None:
    """Found: any database error during a run (a 3-second blip is enough) killed the attempt, and the job then
    sat `running` until the stale window passed."""
    stack, proxy, _ = faulty
    experiment_id = _running_with_a_checkpoint(stack, tiny_model, chat_file)
    proxy.stop()  # every connection cut, new ones refused
    time.sleep(OUTAGE_S)
    proxy.start()
    _assert_one_clean_success(stack, experiment_id)
    assert "database error, retrying" in stack.log("worker")  # the outage did reach the supervisor


def test_a_broker_restart_mid_run_does_not_kill_the_run(
    faulty: tuple[Stack, TcpProxy, RedisServer], tiny_model: Path, chat_file: Path
) -> None:
    stack, _, broker = faulty
    experiment_id = _running_with_a_checkpoint(stack, tiny_model, chat_file)
    broker.kill()  # no persistence: every queued and unacked message is gone
    time.sleep(OUTAGE_S)
    broker.start()
    _assert_one_clean_success(stack, experiment_id)
    # The worker reconnected: a job submitted after the restart runs too.
    with stack.http() as http:
        dataset = upload(http, chat_file)
        exp = submit(http, dataset["id"], tiny_model, max_steps=3)
    assert follow(stack, exp["id"])[-1][2]["status"] == "succeeded"
