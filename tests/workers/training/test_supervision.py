"""Supervision of one training attempt (workers/training/supervisor.py) with a FAKE trainer child.

``training.python`` points at a small script that stands in for ``python -m workers.training.run
config.json``: it reads the config the supervisor prepared, writes JSON lines to the run's events file the
way the real child does, prints a log, and exits (or crashes, or waits to be stopped). The supervisor under
test is the real one: it relays events into the experiment's event log, uploads checkpoints and artifacts
to a LocalStorage in tmp, heartbeats, honours stop requests and fencing, and concludes the job.

Fast: no torch, no Celery; the database is the ``db`` fixture's (SQLite in ``make test-fast``).
"""

# ruff: noqa: E402  (imports follow the importorskip that keeps `make gpu` collecting on a bare box)

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# A bare GPU box (`make gpu`, STUDIO_TEST_SERVICES=0) has none of the API's database stack.
pytest.importorskip("sqlmodel")

from app.core.config import Settings, get_settings
from app.core.contracts.events import Failed
from app.core.layout import TRAIN_LOG_FILE, artifact_prefix, checkpoint_prefix
from app.core.storage import LocalStorage
from app.models import Experiment, ExperimentStatus
from tests.fast_rows import events, make_dataset, make_experiment, outbox_rows, reload, set_columns, statuses
from workers import jobs
from workers.training.supervisor import KEEP_CHECKPOINTS, RunFiles, Supervision, prepare_run

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("db")]

LOG_TAIL_LINES = 5
STOP_GRACE_S = 0.5

# What every fake trainer starts with: check it was started as the real one would be, read its config.
PRELUDE = """\
#!{python} -S
import json, os, signal, sys, time
if sys.argv[1:3] != ["-m", "workers.training.run"] or not sys.argv[-1].endswith("config.json"):
    sys.exit(f"fake trainer: unexpected argv {{sys.argv}}")
config = json.load(open(sys.argv[-1]))
out = config["output_dir"]
marks = {marks!r}
os.makedirs(marks, exist_ok=True)
open(os.path.join(marks, "pid"), "w").write(str(os.getpid()))

def emit(type_, **fields):
    with open(config["events_file"], "a") as f:
        f.write(json.dumps({{"type": type_, "time": time.time(), **fields}}) + "\\n")

def save(path, files):
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        open(os.path.join(path, name), "w").write(text)
    return path

def wait_for_mark(name):
    while not os.path.exists(os.path.join(marks, name)):
        time.sleep(0.02)

"""


@dataclass
class Harness:
    settings: Settings
    storage: LocalStorage
    script: Path
    marks: Path

    def trainer(self, body: str) -> None:
        """Write the fake trainer that the supervisor will start."""
        prelude = PRELUDE.format(python=sys.executable, marks=str(self.marks))
        self.script.write_text(prelude + textwrap.dedent(body))
        self.script.chmod(0o755)

    def claimed(self) -> tuple[Experiment, RunFiles]:
        """A job claimed by attempt 1, its run dir prepared as ``run_training`` does."""
        experiment = make_experiment(dataset=make_dataset(storage=self.storage))
        claimed = jobs.claim(experiment.id, 1, "test-worker")
        assert claimed is not None
        files = RunFiles(Path(self.settings.training.work_dir) / str(experiment.id) / "attempt-1")
        prepare_run(claimed, files, self.settings, self.storage)
        return claimed, files

    def supervise(self, experiment: Experiment, files: RunFiles) -> str:
        return Supervision(experiment.id, 1, files, self.settings, self.storage).run()

    def in_background(self, experiment: Experiment, files: RunFiles) -> Callable[[], str]:
        """Supervise on a thread; returns a function that waits for the outcome."""
        outcome: list[str] = []
        thread = threading.Thread(target=lambda: outcome.append(self.supervise(experiment, files)), daemon=True)
        thread.start()

        def result() -> str:
            thread.join(timeout=30)
            assert not thread.is_alive(), "supervision did not end"
            return outcome[0]

        return result

    def mark(self, name: str) -> None:
        (self.marks / name).touch()

    def child_pid(self) -> int:
        return int((self.marks / "pid").read_text())


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    script = tmp_path / "fake-python"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_TRAINING__PYTHON", str(script))
        mp.setenv("STUDIO_TRAINING__WORK_DIR", str(tmp_path / "runs"))
        mp.setenv("STUDIO_TRAINING__HEARTBEAT_INTERVAL_S", "0.1")
        mp.setenv("STUDIO_TRAINING__STOP_GRACE_S", str(STOP_GRACE_S))
        mp.setenv("STUDIO_TRAINING__LOG_TAIL_LINES", str(LOG_TAIL_LINES))
        mp.setenv("STUDIO_STORAGE__ROOT", str(tmp_path / "storage"))
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # one process, not an accelerate launch
        get_settings.cache_clear()
        settings = get_settings()
        harness = Harness(settings, LocalStorage(Path(settings.storage.root)), script, tmp_path / "marks")
        yield harness
    get_settings.cache_clear()
    if (harness.marks / "pid").exists():  # a failed test may leave its fake trainer waiting: end it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(harness.child_pid(), signal.SIGKILL)


def _wait_for(condition: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()


def test_events_are_relayed_while_the_trainer_runs_and_a_completed_run_succeeds(harness: Harness) -> None:
    harness.trainer("""
        emit("started", max_steps=4, start_step=0)
        emit("metrics", step=1, loss=2.5)
        emit("metrics", step=2, loss=1.25)
        ckpt = save(out + "/checkpoints/checkpoint-2", {"adapter_model.safetensors": "weights@2", "state.json": "{}"})
        emit("checkpoint", step=2, path=ckpt)
        wait_for_mark("go")
        print("training finished", flush=True)
        final = save(out + "/final", {"adapter_model.safetensors": "final weights", "adapter_config.json": "{}"})
        emit("completed", final_dir=final, metrics={"train_loss": 1.5, "steps": 4})
    """)
    experiment, files = harness.claimed()
    outcome = harness.in_background(experiment, files)

    # While the child still runs: its events are in the event log, the checkpoint is in storage.
    _wait_for(lambda: events(experiment.id, "checkpoint"), "the checkpoint event")
    assert [kind for kind, _ in events(experiment.id)] == ["status", "started", "metrics", "metrics", "checkpoint"]
    assert reload(experiment.id).status is ExperimentStatus.running
    started, metrics = events(experiment.id, "started"), events(experiment.id, "metrics")
    assert started[0][1]["max_steps"] == 4
    assert [(d["step"], d["loss"]) for _, d in metrics] == [(1, 2.5), (2, 1.25)]
    [(_, checkpoint)] = events(experiment.id, "checkpoint")
    key = f"{checkpoint_prefix(experiment.id)}/checkpoint-2"
    assert (checkpoint["step"], checkpoint["key"]) == (2, key)
    assert harness.storage.open(f"{key}/adapter_model.safetensors").read() == b"weights@2"
    assert not (files.output / "checkpoints" / "checkpoint-2").exists(), "an uploaded checkpoint frees its disk"

    harness.mark("go")
    assert outcome() == "succeeded"

    row = reload(experiment.id)
    assert row.status is ExperimentStatus.succeeded
    assert (row.final_metrics, row.error, row.pid) == ({"train_loss": 1.5, "steps": 4}, None, None)
    assert row.finished_at is not None
    assert statuses(experiment.id) == ["running", "succeeded"]
    prefix = artifact_prefix(experiment.id)
    stored = {obj.key.removeprefix(prefix + "/") for obj in harness.storage.list(prefix)}
    assert stored == {"adapter_model.safetensors", "adapter_config.json", TRAIN_LOG_FILE}
    assert harness.storage.open(f"{prefix}/adapter_model.safetensors").read() == b"final weights"
    assert b"training finished" in harness.storage.open(f"{prefix}/{TRAIN_LOG_FILE}").read()


def test_storage_keeps_only_the_newest_checkpoints(harness: Harness) -> None:
    harness.trainer("""
        for step in (1, 2, 3):
            emit("checkpoint", step=step, path=save(f"{out}/checkpoints/checkpoint-{step}", {"w": str(step)}))
            time.sleep(0.3)  # one relay pass each
        emit("completed", final_dir=save(out + "/final", {"w": "final"}))
    """)
    experiment, files = harness.claimed()

    assert harness.supervise(experiment, files) == "succeeded"

    keys = [data["key"] for _, data in events(experiment.id, "checkpoint")]
    assert [key.rsplit("/", 1)[-1] for key in keys] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    stored = {obj.key.split("/")[3] for obj in harness.storage.list(checkpoint_prefix(experiment.id))}
    assert stored == {"checkpoint-2", "checkpoint-3"} and KEEP_CHECKPOINTS == 2


def test_a_reported_failure_fails_the_job_with_the_trainers_own_error(harness: Harness) -> None:
    harness.trainer("""
        emit("started", max_steps=10, start_step=0)
        for i in range(20):
            print(f"log line {i}")
        emit("failed", error_type="OutOfMemoryError", message="CUDA out of memory. Tried to allocate 2.00 GiB",
             last_frame="/srv/workers/training/run.py:212 in train", traceback="Traceback (most recent call last): ...",
             step=3)
        sys.exit(1)
    """)
    experiment, files = harness.claimed()

    assert harness.supervise(experiment, files) == "failed"

    expected = Failed(
        error_type="OutOfMemoryError",
        message="CUDA out of memory. Tried to allocate 2.00 GiB",
        last_frame="/srv/workers/training/run.py:212 in train",
    ).summary()
    row = reload(experiment.id)
    assert row.status is ExperimentStatus.failed
    assert row.error == expected
    assert row.log_tail == "\n".join(f"log line {i}" for i in range(20 - LOG_TAIL_LINES, 20))
    assert row.finished_at is not None
    assert [data for _, data in events(experiment.id, "status")][-1] == {
        "status": "failed",
        "attempt": 1,
        "error": expected,
    }
    assert [kind for kind, _ in events(experiment.id)] == ["status", "started", "status"]


@pytest.mark.parametrize(
    ("crash", "error"),
    [
        ("sys.exit(3)", "trainer exited with code 3 without reporting an error"),
        ("os.kill(os.getpid(), signal.SIGABRT)", "trainer killed by signal SIGABRT"),
    ],
    ids=["exit-3", "sigabrt"],
)
def test_a_crash_without_an_event_fails_the_job_naming_how_it_ended(harness: Harness, crash: str, error: str) -> None:
    harness.trainer(f"""
        emit("started", max_steps=10, start_step=0)
        print("loading the model", flush=True)
        {crash}
    """)
    experiment, files = harness.claimed()

    assert harness.supervise(experiment, files) == "failed"

    row = reload(experiment.id)
    assert (row.status, row.error) == (ExperimentStatus.failed, error)
    assert row.log_tail is not None and "loading the model" in row.log_tail
    assert statuses(experiment.id) == ["running", "failed"]


def test_a_completed_event_does_not_make_a_nonzero_exit_a_success(harness: Harness) -> None:
    harness.trainer("""
        emit("completed", final_dir=save(out + "/final", {"w": "final"}), metrics={"train_loss": 1.0})
        sys.exit(2)  # e.g. the trainer crashed while shutting down after saving
    """)
    experiment, files = harness.claimed()

    assert harness.supervise(experiment, files) == "failed"

    row = reload(experiment.id)
    assert (row.status, row.error) == (ExperimentStatus.failed, "trainer exited with code 2 without reporting an error")
    assert harness.storage.list(artifact_prefix(experiment.id)) == []


def test_a_stop_request_reaches_the_trainer_and_cancels_the_job(harness: Harness) -> None:
    harness.trainer("""
        def on_term(signum, frame):
            seen = f"signal={signum} stop_file={os.path.exists(config['stop_file'])}"
            open(os.path.join(marks, "stopped"), "w").write(seen)
            emit("stopped", step=1, reason="stop file")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        emit("started", max_steps=1000, start_step=0)
        while True:
            time.sleep(0.02)
    """)
    experiment, files = harness.claimed()
    outcome = harness.in_background(experiment, files)
    _wait_for(lambda: events(experiment.id, "started"), "the trainer to start")

    set_columns(experiment.id, stop_requested=True)  # POST /stop on a running job

    assert outcome() == "cancelled"
    assert (harness.marks / "stopped").read_text() == f"signal={int(signal.SIGTERM)} stop_file=True"
    row = reload(experiment.id)
    assert (row.status, row.error) == (ExperimentStatus.cancelled, None)
    assert statuses(experiment.id) == ["running", "cancelled"]
    assert events(experiment.id, "stopped")[0][1]["reason"] == "stop file"


def test_a_trainer_that_ignores_the_stop_is_killed_after_the_grace_period(harness: Harness) -> None:
    harness.trainer("""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit("started", max_steps=1000, start_step=0)
        while True:
            time.sleep(0.02)
    """)
    experiment, files = harness.claimed()
    outcome = harness.in_background(experiment, files)
    _wait_for(lambda: events(experiment.id, "started"), "the trainer to start")

    stopped_at = time.monotonic()
    set_columns(experiment.id, stop_requested=True)

    assert outcome() == "cancelled"
    assert time.monotonic() - stopped_at >= STOP_GRACE_S
    assert not _alive(harness.child_pid())
    assert reload(experiment.id).status is ExperimentStatus.cancelled


def test_a_supervisor_that_lost_the_job_kills_its_trainer_and_writes_nothing(harness: Harness) -> None:
    harness.trainer("""
        emit("started", max_steps=1000, start_step=0)
        while True:
            time.sleep(0.02)
    """)
    experiment, files = harness.claimed()
    outcome = harness.in_background(experiment, files)
    _wait_for(lambda: events(experiment.id, "started"), "the trainer to start")

    # The reaper gave the job up (this supervisor looked dead) and another worker claimed attempt 2.
    set_columns(experiment.id, status=ExperimentStatus.queued)
    assert jobs.claim(experiment.id, 2, "other-worker") is not None
    after_claim = reload(experiment.id)
    log = events(experiment.id)

    assert outcome() == "lost"
    assert not _alive(harness.child_pid())
    row = reload(experiment.id)
    assert (row.status, row.attempt, row.worker) == (ExperimentStatus.running, 2, "other-worker")
    assert (row.error, row.finished_at, row.pid) == (None, None, after_claim.pid)
    assert events(experiment.id) == log
    assert statuses(experiment.id) == ["running", "running"]


# ------------------------------------------------------------------ interruptions are never a success


def test_a_trainer_stopped_by_sigterm_is_handed_off_not_succeeded(harness: Harness) -> None:
    """A SIGTERM that reaches the trainer (a systemd stop, a node drain) ends the run early: the job goes
    back to the queue as the next attempt, at once, resuming from the checkpoint of the stop step."""
    harness.trainer("""
        emit("started", max_steps=4000, start_step=0)
        ckpt = save(os.path.join(out, "checkpoints", "checkpoint-422"), {"trainer_state.json": "{}"})
        emit("checkpoint", step=422, path=ckpt)
        emit("stopped", step=422, reason="sigterm")
        emit("completed", final_dir=save(os.path.join(out, "final"), {"x": "y"}), metrics={}, stopped=True)
    """)
    experiment, files = harness.claimed()

    assert harness.supervise(experiment, files) == "handed off"

    row = reload(experiment.id)
    assert (row.status, row.attempt, row.worker_losses) == (ExperimentStatus.queued, 1, 0)
    assert statuses(experiment.id) == ["running", "queued"]
    reason = events(experiment.id, "status")[-1][1]["reason"]
    assert "sigterm" in reason and "checkpoint-422" in reason and "attempt 2" in reason
    assert not harness.storage.list(artifact_prefix(experiment.id))  # nothing was delivered
    [message] = [m for m in outbox_rows(experiment.queue) if m.payload["attempt"] == 2]
    assert message.not_before is None  # no backoff: a handoff is not a failure
    assert jobs.claim(experiment.id, 2, "other-worker") is not None


def test_a_completed_run_that_stopped_early_is_never_a_success(harness: Harness) -> None:
    harness.trainer("""
        emit("started", max_steps=4000, start_step=0)
        emit("completed", final_dir=save(os.path.join(out, "final"), {"x": "y"}), metrics={}, stopped=True)
    """)
    experiment, files = harness.claimed()
    assert harness.supervise(experiment, files) == "handed off"
    assert reload(experiment.id).status is ExperimentStatus.queued


def test_a_worker_shutting_down_hands_its_job_off_after_a_checkpoint(harness: Harness) -> None:
    """Celery's warm shutdown marks the worker's jobs (request_handoff); the supervisor writes "handoff" into
    the stop file and SIGTERMs the trainer, which checkpoints and exits; the job is queued as attempt 2."""
    harness.trainer("""
        def on_term(signum, frame):
            reason = open(config["stop_file"]).read()
            ckpt = save(os.path.join(out, "checkpoints", "checkpoint-7"), {"trainer_state.json": "{}"})
            emit("checkpoint", step=7, path=ckpt)
            emit("stopped", step=7, reason=reason)
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        emit("started", max_steps=1000, start_step=0)
        while True:
            time.sleep(0.02)
    """)
    experiment, files = harness.claimed()
    outcome = harness.in_background(experiment, files)
    _wait_for(lambda: events(experiment.id, "started"), "the trainer to start")

    assert jobs.request_handoff("test-worker") == 1
    assert jobs.request_handoff("some-other-worker") == 0

    assert outcome() == "handed off"
    assert events(experiment.id, "stopped")[0][1]["reason"] == "handoff"
    row = reload(experiment.id)
    assert (row.status, row.handoff_requested, row.worker) == (ExperimentStatus.queued, False, None)
    assert harness.storage.list(f"{checkpoint_prefix(experiment.id)}/checkpoint-7")


def test_sigterm_to_the_supervisor_itself_hands_the_job_off_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `_sigterm_hands_off` wires to SIGTERM in the worker's pool process: `hand_off`. Found: the
    heartbeat thread saw it only at its next beat, by when a small model had trained to its end, and the
    job was `succeeded` although its worker was stopping. With a beat a minute apart, the handoff must
    still reach the trainer well within the join below."""
    monkeypatch.setattr(harness.settings.training, "heartbeat_interval_s", 60.0)
    harness.trainer("""
        signal.signal(signal.SIGTERM, lambda *_: (emit("stopped", step=3, reason="handoff"), sys.exit(0)))
        emit("started", max_steps=1000, start_step=0)
        while True:
            time.sleep(0.02)
    """)
    experiment, files = harness.claimed()
    supervision = Supervision(experiment.id, 1, files, harness.settings, harness.storage)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(supervision.run()), daemon=True)
    thread.start()
    _wait_for(lambda: events(experiment.id, "started"), "the trainer to start")
    supervision.hand_off()
    thread.join(timeout=30)
    assert outcome == ["handed off"]
    assert reload(experiment.id).status is ExperimentStatus.queued


def test_a_trainer_that_ignores_the_handoff_is_killed_after_the_grace_and_still_handed_off(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness.settings.training, "handoff_grace_s", 0.5)
    harness.trainer("""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit("started", max_steps=1000, start_step=0)
        while True:
            time.sleep(0.02)
    """)
    experiment, files = harness.claimed()
    outcome = harness.in_background(experiment, files)
    _wait_for(lambda: events(experiment.id, "started"), "the trainer to start")
    jobs.request_handoff("test-worker")
    assert outcome() == "handed off"
    assert "resumes from its last checkpoint" in events(experiment.id, "status")[-1][1]["reason"]


def test_a_database_blip_while_relaying_events_is_retried_not_fatal(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    real_add_events = jobs.add_events
    failures = {"left": 2}  # 0.5 s + 1 s of backoff

    def flaky_add_events(*args: object, **kwargs: object) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        real_add_events(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jobs, "add_events", flaky_add_events)
    harness.trainer("""
        emit("started", max_steps=1, start_step=0)
        emit("metrics", step=1, loss=1.0)
        emit("completed", final_dir=save(os.path.join(out, "final"), {"x": "y"}), metrics={"global_step": 1})
    """)
    experiment, files = harness.claimed()
    assert harness.supervise(experiment, files) == "succeeded"
    assert failures["left"] == 0
    assert [data["step"] for _, data in events(experiment.id, "metrics")] == [1]


def test_a_trainer_killed_from_outside_counts_a_loss_and_is_retried_then_failed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL that the supervisor did not send (the OOM killer, kill -9): not the run's own error, so the job is
    retried from its checkpoint, within training.max_attempts like a lost worker, never looped forever."""
    monkeypatch.setattr(harness.settings.training, "max_attempts", 2)
    harness.trainer("""
        emit("started", max_steps=10, start_step=0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    experiment, files = harness.claimed()

    assert harness.supervise(experiment, files) == "trainer killed; job queued"
    row = reload(experiment.id)
    assert (row.status, row.worker_losses) == (ExperimentStatus.queued, 1)
    assert "SIGKILL" in events(experiment.id, "status")[-1][1]["reason"]
    [retry] = [m for m in outbox_rows(experiment.queue) if m.payload["attempt"] == 2]
    assert retry.not_before is not None  # after a backoff

    claimed = jobs.claim(experiment.id, 2, "test-worker")
    assert claimed is not None
    files = RunFiles(Path(harness.settings.training.work_dir) / str(experiment.id) / "attempt-2")
    prepare_run(claimed, files, harness.settings, harness.storage)
    assert Supervision(experiment.id, 2, files, harness.settings, harness.storage).run() == "trainer killed; job failed"
    row = reload(experiment.id)
    assert row.status is ExperimentStatus.failed and row.error is not None and "lost 2 times" in row.error
