"""Job ownership on the worker side (workers/jobs.py): a job is claimed by attempt number, and every later
write of an attempt that lost the job (requeued, claimed again) is fenced off.

Fast: in-process, on the ``db`` fixture's database (SQLite in ``make test-fast``), no broker, no worker.
"""

# ruff: noqa: E402  (imports follow the importorskip that keeps `make gpu` collecting on a bare box)

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

# A bare GPU box (`make gpu`, STUDIO_TEST_SERVICES=0) has none of the API's database stack.
pytest.importorskip("sqlmodel")

from app.core.db import session_scope
from app.core.event_log import Fenced
from app.models import Experiment, ExperimentStatus, utcnow
from app.services.experiments import requeue_stale
from tests.fast_rows import events, make_experiment, reload, set_columns, statuses
from workers import jobs

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("db")]


def test_only_one_of_two_claims_of_the_same_attempt_wins() -> None:
    experiment = make_experiment()
    start = threading.Barrier(2)

    def claim(worker: str) -> str | None:
        start.wait()
        return worker if jobs.claim(experiment.id, 1, worker) is not None else None

    with ThreadPoolExecutor(2) as pool:
        winners = [w for w in pool.map(claim, ["worker-a", "worker-b"]) if w]

    assert len(winners) == 1, winners
    row = reload(experiment.id)
    assert (row.status, row.attempt, row.worker) == (ExperimentStatus.running, 1, winners[0])
    assert statuses(experiment.id) == ["running"]
    # A third delivery of the same message, after the fact, changes nothing either.
    assert jobs.claim(experiment.id, 1, "worker-c") is None
    assert reload(experiment.id).worker == winners[0]
    assert statuses(experiment.id) == ["running"]


def test_claim_marks_the_row_running_and_writes_a_status_event_naming_the_worker() -> None:
    experiment = make_experiment(stop_requested=True)  # left over from an earlier attempt's stop

    claimed = jobs.claim(experiment.id, 1, "worker-1@host")

    assert claimed is not None and claimed.id == experiment.id
    row = reload(experiment.id)
    assert row.status is ExperimentStatus.running
    assert (row.attempt, row.worker, row.stop_requested) == (1, "worker-1@host", False)
    assert row.heartbeat_at is not None and row.started_at is not None
    assert events(experiment.id) == [("status", {"status": "running", "attempt": 1, "worker": "worker-1@host"})]


@pytest.mark.parametrize("attempt", [1, 3], ids=["stale", "from-the-future"])
def test_claim_of_another_attempt_number_does_nothing(attempt: int) -> None:
    # Attempt 1 ran and was requeued: the row waits, queued @ 1, for the message of attempt 2.
    experiment = make_experiment(attempt=1)

    assert jobs.claim(experiment.id, attempt, "late-worker") is None

    row = reload(experiment.id)
    assert (row.status, row.attempt, row.worker) == (ExperimentStatus.queued, 1, None)
    assert events(experiment.id) == []
    assert jobs.claim(experiment.id, 2, "worker") is not None  # the right message still claims it


@pytest.mark.parametrize("terminal", [ExperimentStatus.cancelled, ExperimentStatus.succeeded])
def test_claim_of_a_job_no_longer_queued_does_nothing(terminal: ExperimentStatus) -> None:
    experiment = make_experiment(status=terminal)

    assert jobs.claim(experiment.id, 1, "worker") is None
    assert reload(experiment.id).status is terminal
    assert events(experiment.id) == []


def test_heartbeat_of_the_owner_refreshes_it_and_reports_a_stop_request() -> None:
    experiment = make_experiment()
    claimed = jobs.claim(experiment.id, 1, "worker")
    assert claimed is not None

    assert jobs.heartbeat(experiment.id, 1, pid=4242) == jobs.Orders(stop=False, handoff=False, pause=False)
    row = reload(experiment.id)
    assert row.pid == 4242
    assert row.heartbeat_at is not None and claimed.heartbeat_at is not None
    assert row.heartbeat_at >= claimed.heartbeat_at

    set_columns(experiment.id, pause_requested=True)  # POST /pause on a running job
    assert jobs.heartbeat(experiment.id, 1) == jobs.Orders(stop=False, handoff=False, pause=True)
    set_columns(experiment.id, stop_requested=True, pause_requested=False)  # POST /stop on a running job
    assert jobs.heartbeat(experiment.id, 1) == jobs.Orders(stop=True, handoff=False, pause=False)


# ---------------------------------------------------------------- fencing


def _lose_attempt_1(*, claimed_again: bool) -> tuple[Experiment, list[tuple[str, dict[str, Any]]]]:
    """Attempt 1 runs and misses its heartbeats; the reaper requeues it, and attempt 2 may have claimed it.
    Returns the row and its event log at that point."""
    experiment = make_experiment()
    assert jobs.claim(experiment.id, 1, "old-worker") is not None
    set_columns(experiment.id, heartbeat_at=utcnow() - timedelta(hours=1))
    with session_scope() as session:
        assert (experiment.id, experiment.team_id) in requeue_stale(session=session, stale_after_s=60)
    if claimed_again:
        assert jobs.claim(experiment.id, 2, "new-worker") is not None
    return reload(experiment.id), events(experiment.id)


def _state(row: Experiment) -> tuple[Any, ...]:
    return tuple(
        getattr(row, name)
        for name in (
            "status",
            "attempt",
            "worker",
            "heartbeat_at",
            "pid",
            "error",
            "log_tail",
            "final_metrics",
            "finished_at",
            "event_seq",
        )
    )


@pytest.mark.parametrize("claimed_again", [False, True], ids=["requeued", "claimed-by-attempt-2"])
def test_a_lost_attempt_cannot_heartbeat(claimed_again: bool) -> None:
    before, log = _lose_attempt_1(claimed_again=claimed_again)

    with pytest.raises(Fenced):
        jobs.heartbeat(before.id, 1, pid=999)

    assert _state(reload(before.id)) == _state(before)
    assert events(before.id) == log


@pytest.mark.parametrize("claimed_again", [False, True], ids=["requeued", "claimed-by-attempt-2"])
def test_a_lost_attempt_cannot_add_events(claimed_again: bool) -> None:
    before, log = _lose_attempt_1(claimed_again=claimed_again)

    with pytest.raises(Fenced):
        jobs.add_events(before.id, 1, [("metrics", {"step": 7, "loss": 1.5}), ("started", {"start_step": 0})])

    assert events(before.id) == log
    assert _state(reload(before.id)) == _state(before)


@pytest.mark.parametrize("outcome", [ExperimentStatus.succeeded, ExperimentStatus.failed, ExperimentStatus.cancelled])
@pytest.mark.parametrize("claimed_again", [False, True], ids=["requeued", "claimed-by-attempt-2"])
def test_a_lost_attempt_cannot_finish(claimed_again: bool, outcome: ExperimentStatus) -> None:
    before, log = _lose_attempt_1(claimed_again=claimed_again)

    done = jobs.finish(
        before.id, 1, outcome, error="from the old worker", log_tail="old log", final_metrics={"loss": 9.9}
    )

    assert done is False
    assert _state(reload(before.id)) == _state(before)
    assert events(before.id) == log


def test_the_new_owner_keeps_working_after_the_old_one_is_fenced() -> None:
    row, _ = _lose_attempt_1(claimed_again=True)
    experiment_id: uuid.UUID = row.id
    with pytest.raises(Fenced):
        jobs.heartbeat(experiment_id, 1)

    assert jobs.heartbeat(experiment_id, 2) == jobs.Orders(stop=False, handoff=False, pause=False)
    jobs.add_events(experiment_id, 2, [("metrics", {"step": 1, "loss": 2.0})])
    assert jobs.finish(experiment_id, 2, ExperimentStatus.succeeded, final_metrics={"loss": 2.0}) is True

    final = reload(experiment_id)
    assert (final.status, final.attempt, final.final_metrics) == (ExperimentStatus.succeeded, 2, {"loss": 2.0})
    assert final.finished_at is not None and final.pid is None
    assert statuses(experiment_id) == ["running", "queued", "running", "succeeded"]
    assert events(experiment_id, "metrics") == [("metrics", {"step": 1, "loss": 2.0})]
    # Once finished, even the last owner is fenced: a terminal job takes no more writes.
    with pytest.raises(Fenced):
        jobs.heartbeat(experiment_id, 2)
    assert jobs.finish(experiment_id, 2, ExperimentStatus.failed, error="late") is False
    assert reload(experiment_id).status is ExperimentStatus.succeeded


def test_a_worker_shutting_down_marks_only_its_own_running_jobs_for_handoff() -> None:
    mine, theirs, waiting = make_experiment(), make_experiment(), make_experiment()
    assert jobs.claim(mine.id, 1, "draining@host") is not None
    assert jobs.claim(theirs.id, 1, "busy@host") is not None

    assert jobs.request_handoff("draining@host") == 1

    assert jobs.heartbeat(mine.id, 1) == jobs.Orders(stop=False, handoff=True, pause=False)
    assert jobs.heartbeat(theirs.id, 1) == jobs.Orders(stop=False, handoff=False, pause=False)
    assert reload(waiting.id).handoff_requested is False


def test_hand_off_queues_the_next_attempt_and_fences_the_old_one() -> None:
    experiment = make_experiment()
    assert jobs.claim(experiment.id, 1, "draining@host") is not None
    jobs.request_handoff("draining@host")

    assert jobs.hand_off(experiment.id, 1, "handed off: its worker is shutting down")

    row = reload(experiment.id)
    assert (row.status, row.attempt, row.handoff_requested, row.worker_losses) == (ExperimentStatus.queued, 1, False, 0)
    assert statuses(experiment.id) == ["running", "queued"]
    with pytest.raises(Fenced):
        jobs.heartbeat(experiment.id, 1)
    assert jobs.hand_off(experiment.id, 1, "again") is False  # a second handoff of the same attempt: no-op
    assert jobs.claim(experiment.id, 2, "fresh@host") is not None
