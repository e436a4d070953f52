"""The reaper (app/services/experiments.py::requeue_stale): a running job whose worker stopped heartbeating
goes back to the queue with a message for the next attempt; a live one is left alone; one that was being
stopped is cancelled instead.

Fast: the reaper runs in-process; its outbox message is read back from the table, not sent.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from app.core.config import get_settings
from app.core.contracts.training import TrainMessage
from app.core.db import session_scope
from app.core.job_queue import queue_next_attempt
from app.core.outbox import relay_once
from app.core.queues import TRAIN_TASK
from app.models import Experiment, ExperimentStatus, Role, utcnow
from app.services.experiments import requeue_stale, resend_unclaimed, start_experiment
from app.services.principal import Principal
from tests.accounts import make_member
from tests.fast_rows import events, make_experiment, outbox_rows, reload, set_columns, statuses
from workers import jobs

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("db")]

STALE_AFTER_S = 60.0
BACKOFF_S = 30.0


def _reap(max_attempts: int = 3, backoff_s: float = BACKOFF_S) -> list[tuple[uuid.UUID, uuid.UUID]]:
    with session_scope() as session:
        lost = requeue_stale(
            session=session, stale_after_s=STALE_AFTER_S, max_attempts=max_attempts, backoff_s=backoff_s
        )
        return list(lost)


def test_a_stale_running_job_is_requeued_for_the_next_attempt() -> None:
    experiment = make_experiment(status=ExperimentStatus.running, attempt=3, heartbeat_age_s=STALE_AFTER_S * 2)

    assert (experiment.id, experiment.team_id) in _reap()

    row = reload(experiment.id)
    assert (row.status, row.attempt, row.stop_requested) == (ExperimentStatus.queued, 3, False)
    [(_, status)] = events(experiment.id, "status")
    assert (status["status"], status["attempt"]) == ("queued", 3)
    assert "stopped heartbeating (1 of 3); requeued" in status["reason"]
    [message] = outbox_rows(experiment.queue)
    assert (message.task_name, message.sent_at) == (TRAIN_TASK, None)
    assert TrainMessage.model_validate(message.payload) == TrainMessage(experiment_id=experiment.id, attempt=4)
    assert message.payload == TrainMessage(experiment_id=experiment.id, attempt=4).kwargs()
    # That message claims the job; a late copy of the lost attempt's message does not.
    assert jobs.claim(experiment.id, 3, "late-duplicate") is None
    assert jobs.claim(experiment.id, 4, "worker") is not None


def test_a_job_with_a_fresh_heartbeat_stays_running() -> None:
    experiment = make_experiment(status=ExperimentStatus.running, attempt=1, heartbeat_age_s=STALE_AFTER_S / 4)

    assert (experiment.id, experiment.team_id) not in _reap()

    row = reload(experiment.id)
    assert (row.status, row.attempt) == (ExperimentStatus.running, 1)
    assert events(experiment.id) == []
    assert outbox_rows(experiment.queue) == []


def test_a_stale_job_that_was_being_stopped_is_cancelled_not_requeued() -> None:
    experiment = make_experiment(
        status=ExperimentStatus.running, attempt=2, heartbeat_age_s=STALE_AFTER_S * 2, stop_requested=True
    )

    assert (experiment.id, experiment.team_id) in _reap()

    row = reload(experiment.id)
    assert row.status is ExperimentStatus.cancelled
    assert row.finished_at is not None
    assert statuses(experiment.id) == ["cancelled"]
    assert events(experiment.id)[0][1]["reason"] == "worker lost while stopping"
    assert outbox_rows(experiment.queue) == []


@pytest.mark.parametrize("status", [ExperimentStatus.queued, ExperimentStatus.succeeded, ExperimentStatus.failed])
def test_only_running_jobs_are_reaped(status: ExperimentStatus) -> None:
    experiment = make_experiment(status=status, attempt=1, heartbeat_age_s=STALE_AFTER_S * 10)

    assert (experiment.id, experiment.team_id) not in _reap()

    assert reload(experiment.id).status is status
    assert outbox_rows(experiment.queue) == []


def test_a_job_requeued_once_is_not_requeued_again_by_the_next_pass() -> None:
    experiment = make_experiment(status=ExperimentStatus.running, attempt=1, heartbeat_age_s=STALE_AFTER_S * 2)

    _reap()
    _reap()

    assert statuses(experiment.id) == ["queued"]
    assert len(outbox_rows(experiment.queue)) == 1


def _lose_worker(experiment_id: uuid.UUID, attempt: int) -> None:
    """The next attempt is claimed, then its worker goes silent."""
    assert jobs.claim(experiment_id, attempt, f"worker-{attempt}") is not None
    set_columns(experiment_id, heartbeat_at=utcnow() - timedelta(seconds=STALE_AFTER_S * 2))


def test_each_worker_loss_waits_a_longer_backoff_before_the_job_is_sent_again() -> None:
    experiment = make_experiment(status=ExperimentStatus.running, attempt=1, heartbeat_age_s=STALE_AFTER_S * 2)
    before = utcnow()
    _reap()
    _lose_worker(experiment.id, 2)
    _reap()
    first, second = outbox_rows(experiment.queue)
    assert first.not_before is not None and second.not_before is not None
    # 30 s after the first loss, 60 s after the second: a job that takes its worker down does not spin.
    assert abs((first.not_before - before).total_seconds() - BACKOFF_S) < 5
    assert abs((second.not_before - before).total_seconds() - 2 * BACKOFF_S) < 5
    # The relay leaves a row alone until it is due.
    sent: list[str] = []
    with session_scope() as session:
        relay_once(session=session, send=lambda task, queue, kwargs: sent.append(queue))
    assert experiment.queue not in sent


def test_after_max_attempts_worker_losses_the_job_fails_with_the_reason() -> None:
    experiment = make_experiment(status=ExperimentStatus.running, attempt=1, heartbeat_age_s=STALE_AFTER_S * 2)
    _reap(max_attempts=2)
    _lose_worker(experiment.id, 2)
    _reap(max_attempts=2)
    row = reload(experiment.id)
    assert row.status is ExperimentStatus.failed and row.worker_losses == 2
    assert row.error is not None and "lost 2 times" in row.error and "worker-2" in row.error
    assert len(outbox_rows(experiment.queue)) == 1  # the first requeue only; nothing after giving up
    assert statuses(experiment.id)[-1] == "failed"


def test_starting_again_gives_a_fresh_budget() -> None:
    experiment = make_experiment(status=ExperimentStatus.running, attempt=1, heartbeat_age_s=STALE_AFTER_S * 2)
    _reap(max_attempts=1)
    assert reload(experiment.id).status is ExperimentStatus.failed
    admin = make_member(experiment.team_id, Role.admin)
    with session_scope() as session:
        row = session.get(Experiment, experiment.id)
        assert row is not None
        start_experiment(
            session=session,
            settings=get_settings(),
            actor=Principal(admin.user_id, admin.team_id, Role.admin),
            experiment=row,
        )
    row = reload(experiment.id)
    assert (row.status, row.worker_losses) == (ExperimentStatus.queued, 0)
    assert outbox_rows(experiment.queue)[-1].not_before is None  # the user's start is not delayed


def _resend(after_s: float) -> list[uuid.UUID]:
    with session_scope() as session:
        return resend_unclaimed(session=session, resend_after_s=after_s)


def test_a_job_queued_too_long_without_a_claim_is_sent_again_with_doubling_intervals() -> None:
    experiment = make_experiment()
    with session_scope() as session:
        row = session.get(Experiment, experiment.id)
        assert row is not None
        queue_next_attempt(session, row)
        session.commit()
    assert experiment.id not in _resend(after_s=60)  # just queued
    set_columns(experiment.id, queued_at=utcnow() - timedelta(seconds=90))
    assert experiment.id in _resend(after_s=60)
    first, second = outbox_rows(experiment.queue)
    assert first.payload == second.payload == TrainMessage(experiment_id=experiment.id, attempt=1).kwargs()
    assert experiment.id not in _resend(after_s=60)  # the next resend waits twice as long: 120 s in all
    set_columns(experiment.id, queued_at=utcnow() - timedelta(seconds=130))
    assert experiment.id in _resend(after_s=60)
    assert reload(experiment.id).queue_resends == 2
    # The copies are harmless: one claim wins, the others find the job taken.
    assert jobs.claim(experiment.id, 1, "w1") is not None
    assert jobs.claim(experiment.id, 1, "w2") is None
    assert experiment.id not in _resend(after_s=0.001)  # running jobs are never re-sent
